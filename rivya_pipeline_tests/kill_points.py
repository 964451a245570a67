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
    """The `occurrence`-th write to `database` (a file or database name; "" for any) whose first line starts with
    `statement`, and also names `mentions` (a column, say) and binds `parameter` (an event type, say) when given."""

    database: str
    statement: str
    occurrence: int = 1
    mentions: str | None = None
    parameter: str | None = None

    def __str__(self) -> str:
        named = f" naming {self.mentions!r}" if self.mentions else ""
        bound = f" binding {self.parameter!r}" if self.parameter else ""
        return f"{self.database or 'any database'}: {self.statement}{named}{bound} (#{self.occurrence})"

    def matches(self, database: str, line: str, parameters: Any) -> bool:
        return (
            self.database in ("", database)
            and line.startswith(self.statement)
            and (self.mentions is None or self.mentions in line)
            and (self.parameter is None or self.parameter in _bound_values(parameters))
        )


def _bound_values(parameters: Any) -> list[Any]:
    """The values a statement binds, whatever the driver's shape (a tuple, a dict, or a list of them)."""
    rows = parameters if isinstance(parameters, list) else [parameters]
    return [value for row in rows for value in (row.values() if isinstance(row, dict) else row or ())]


@contextmanager
def on_each_write(action: Callable[[str, str, Any], None]) -> Iterator[None]:
    """Inside the block, `action(database name, first line of the statement, its parameters)` runs just before
    every SQL write."""

    def before_execute(conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        line = statement.strip().splitlines()[0].strip()
        if line.upper().startswith(WRITES):
            action(Path(conn.engine.url.database or "").name, line, parameters)

    event.listen(Engine, "before_cursor_execute", before_execute)
    try:
        yield
    finally:
        event.remove(Engine, "before_cursor_execute", before_execute)


@contextmanager
def recording_writes() -> Iterator[list[str]]:
    """The first line of every SQL write this process makes inside the block."""
    writes: list[str] = []
    with on_each_write(lambda _database, line, _parameters: writes.append(line)):
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

    def die_at_the_point(database: str, line: str, parameters: Any) -> None:
        nonlocal matches
        if point.matches(database, line, parameters):
            matches += 1
            if matches == point.occurrence:
                os.kill(os.getpid(), signal.SIGKILL)

    with on_each_write(die_at_the_point):
        open_store()


def _record_writes(open_store: Callable[[], object], log: Path) -> None:
    writes: list[tuple[str, str]] = []
    with on_each_write(lambda database, line, _parameters: writes.append((database, line))):
        open_store()
    log.write_text(json.dumps(writes))


def _open_at(open_store: Callable[[], object], barrier: Any) -> None:
    barrier.wait(PROCESS_TIMEOUT_SECONDS)
    open_store()
