"""What the benchmarks share: their result shape, pending tasks on the emulator and in a ledger."""

from __future__ import annotations

import bisect
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import create_engine, insert

from ..ledger import Ledger
from ..ledger.schema import tasks
from ..rivya import GenerationTask, RivyaClient

# A valid kling-3-0 request; each create gets its own Idempotency-Key, so each is a new task.
TASK_BODY = {"model": "kling-3-0", "prompt": "A paper boat on a pond.", "params": {"duration": "5"}}
CREATE_THREADS = 32
Figure = float | int | bool | str


@dataclass
class BenchResult:
    """One benchmark's figures (the JSON keys), what it ran, and each goal with whether this run met it."""

    name: str
    figures: dict[str, Figure | dict[str, Figure]]  # a dict: one variant's figures under its name (bench scale)
    setup: str
    goals: list[tuple[str, bool]] = field(default_factory=list)
    bounds: str = ""

    def as_json(self) -> dict[str, object]:
        return {**self.figures, "goals_met": all(met for _, met in self.goals), "setup": self.setup}

    def text(self) -> str:
        width = max(len(key) for key in self.figures)
        lines = [f"{self.name}: {self.setup}"]
        for key, value in self.figures.items():
            if isinstance(value, dict):
                lines.append(f"  {key}:")
                lines += [f"    {name.ljust(width - 2)}  {figure}" for name, figure in value.items()]
            else:
                lines.append(f"  {key.ljust(width)}  {value}")
        lines += [f"  goal {'met ' if met else 'MISSED'}  {goal}" for goal, met in self.goals]
        if self.bounds:
            lines.append(f"  bound by: {self.bounds}")
        return "\n".join(lines)


def max_in_any_window(moments: list[float], window_seconds: float = 1.0) -> int:
    """The most moments (seconds, any origin) that fall in one window of this length, wherever it starts."""
    ordered = sorted(moments)
    return max((bisect.bisect_left(ordered, t + window_seconds) - i for i, t in enumerate(ordered)), default=0)


def create_tasks(client: RivyaClient, count: int, key_prefix: str) -> list[GenerationTask]:
    """`count` new tasks on the emulator, created concurrently (setup, not measured)."""
    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        return list(
            pool.map(lambda i: client.create_generation(TASK_BODY, idempotency_key=f"{key_prefix}-{i}"), range(count))
        )


def seed_pending(ledger_url: str, created: list[GenerationTask], *, due_since: timedelta) -> Ledger:
    """A ledger holding `created` as submitted, pending tasks that are all due for a poll.

    Rows are inserted in one statement: going through `begin_submit` + `record_task` costs two commits
    per task (a minute for 10,000), and this is setup, not what is measured.
    """
    ledger = Ledger(ledger_url)  # creates the schema
    now = datetime.now(UTC)
    rows = [
        {
            "idempotency_key": f"bench-{task.id}",
            "brief_id": f"bench-{index}",
            "run_id": "bench",
            "model": TASK_BODY["model"],
            "price_credits": task.reserved_credits,
            "body": json.dumps(TASK_BODY),
            "task_id": task.id,
            "status": task.status,
            "reserved_credits": task.reserved_credits,
            "submitted_at": now - due_since,
            "updated_at": now - due_since,
            "deadline_at": now + timedelta(hours=1),
            "next_poll_at": now - due_since,
        }
        for index, task in enumerate(created)
    ]
    insert_ledger_rows(ledger_url, rows)
    return ledger


def insert_ledger_rows(ledger_url: str, rows: list[dict[str, object]]) -> None:
    """Ledger rows in one statement (setup, not measured: a submit's own path costs two commits per task)."""
    engine = create_engine(ledger_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(tasks), rows)
    finally:
        engine.dispose()
