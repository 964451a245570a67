"""`kill -9` at a chosen SQL write: real processes killed at moments a test names, the same ones on every run.

A child process opens a store (a Dagster instance, a ledger) and sends itself SIGKILL just before a chosen write
reaches the database, the last moment a `kill -9` from outside could land before that write. A kill point is
named by the statement's first line and which occurrence of it, so it does not depend on the order in which a
library happens to create its indexes. Children come from the fork server of `pipeline_process`, which has
imported Dagster once, so a kill costs a set-up, not an interpreter start. This module imports little, because
every child imports it again.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from rivya_pipeline_tests.pipeline_process import FORK_SERVER, new_barrier

WRITES = ("CREATE", "INSERT", "UPDATE", "DELETE", "DROP", "ALTER")
PROCESS_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class KillPoint:
    """The `occurrence`-th write to `database` (a file or database name) whose first line starts with `statement`."""

    database: str
    statement: str
    occurrence: int = 1

    def __str__(self) -> str:
        return f"{self.database}: {self.statement} (#{self.occurrence})"


@contextmanager
def on_each_write(action: Callable[[str, str], None]) -> Iterator[None]:
    """Inside the block, `action(database name, first line of the statement)` runs just before every SQL write."""

    def before_execute(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        line = statement.strip().splitlines()[0].strip()
        if line.upper().startswith(WRITES):
            action(Path(conn.engine.url.database or "").name, line)

    event.listen(Engine, "before_cursor_execute", before_execute)
    try:
        yield
    finally:
        event.remove(Engine, "before_cursor_execute", before_execute)


@contextmanager
def recording_writes() -> Iterator[list[str]]:
    """The first line of every SQL write this process makes inside the block."""
    writes: list[str] = []
    with on_each_write(lambda _database, line: writes.append(line)):
        yield writes


def kill_during_open(point: KillPoint, open_store: Callable[[], object]) -> None:
    """Run `open_store()` in a child killed by SIGKILL just before `point`; fails if the child never got there."""
    exit_code = _run_child(_open_killed_at, point, open_store)
    assert exit_code == -signal.SIGKILL, f"the open ended ({exit_code}) without reaching {point}"


def writes_of_open(open_store: Callable[[], object], scratch: Path) -> list[KillPoint]:
    """Every write `open_store()` makes in a child, in order, each as the point just before it."""
    log = scratch / f"writes-{uuid.uuid4().hex[:8]}.json"
    assert _run_child(_record_writes, open_store, log) == 0
    seen = Counter[tuple[str, str]]()
    points = []
    for database, line in json.loads(log.read_text()):
        seen[database, line] += 1
        points.append(KillPoint(database, line, seen[database, line]))
    return points


def open_together(open_store: Callable[[], object], processes: int) -> list[int]:
    """`open_store()` in `processes` children released at the same moment; their exit codes."""
    barrier = new_barrier(processes)
    children = [FORK_SERVER.Process(target=_open_at, args=(open_store, barrier), daemon=True) for _ in range(processes)]
    for child in children:
        child.start()
    for child in children:
        child.join(PROCESS_TIMEOUT_SECONDS)
    return [child.exitcode for child in children]


def _run_child(target: Callable[..., None], *args: object) -> int | None:
    child = FORK_SERVER.Process(target=target, args=args, daemon=True)
    child.start()
    child.join(PROCESS_TIMEOUT_SECONDS)
    return child.exitcode


def _open_killed_at(point: KillPoint, open_store: Callable[[], object]) -> None:
    matches = 0

    def die_at_the_point(database: str, line: str) -> None:
        nonlocal matches
        if database == point.database and line.startswith(point.statement):
            matches += 1
            if matches == point.occurrence:
                os.kill(os.getpid(), signal.SIGKILL)

    with on_each_write(die_at_the_point):
        open_store()


def _record_writes(open_store: Callable[[], object], log: Path) -> None:
    writes: list[tuple[str, str]] = []
    with on_each_write(lambda database, line: writes.append((database, line))):
        open_store()
    log.write_text(json.dumps(writes))


def _open_at(open_store: Callable[[], object], barrier: Any) -> None:
    barrier.wait(PROCESS_TIMEOUT_SECONDS)
    open_store()
