"""`bench calls`: status calls per task over a 60 s generation, and none for a task that already ended.

The poller's cadence (first poll 2.5 s after submit, then every 10 s, slower after 5 min) is reckoned in
wall-clock time, so a 60 s generation takes a minute of real time per run. To keep the benchmark short
without bending the count, both clocks run `TIME_SCALE` times faster together: the emulator's
(`time_scale`) and the poller's (its `clock`). Ticks come every 5 s of that clock, the sensor's minimum
interval. The count is the emulator's own (its per-task GET /generations counter), never the client's.

The baseline, measured the same way on fresh tasks, is a loop polling every task every 5 s (the fast
end of Rivya's guidance) from submit until it ends.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..ledger import CreditLimits, Ledger
from ..polling import FIRST_POLL_SECONDS, TaskPoller
from ..rivya import RivyaClient
from .common import TASK_BODY, BenchResult, Figure
from .poll import CONCURRENCY, REQUESTS_PER_SECOND
from .stack import BenchStack

GENERATION_SECONDS = 60.0
QUEUED_SECONDS = 5.0
TICK_SECONDS = 5.0  # the sensor's minimum interval
BASELINE_INTERVAL_SECONDS = 5.0
WATCH_AFTER_END_SECONDS = 60.0  # ticks go on this long after the last task ended: no call may follow
FULL = {"tasks": 50, "terminal_tasks": 50, "time_scale": 10.0}
QUICK = {"tasks": 8, "terminal_tasks": 8, "time_scale": 30.0}
GOAL_POLLS_PER_TASK = 8


class ScaledClock:
    """UTC time that runs `scale` times faster than the wall clock from the moment it is made."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self._wall, self._monotonic = datetime.now(UTC), time.monotonic()

    def __call__(self) -> datetime:
        return self._wall + timedelta(seconds=(time.monotonic() - self._monotonic) * self.scale)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds / self.scale)


def _start(stack: BenchStack, scale: float) -> ScaledClock:
    """Reset the emulator (its clock starts at 0) and start the matching clock at the same moment."""
    stack.configure(
        time_scale=scale, queued_seconds=QUEUED_SECONDS, processing_seconds=GENERATION_SECONDS - QUEUED_SECONDS
    )
    return ScaledClock(scale)


def _submit(client: RivyaClient, ledger: Ledger, clock: ScaledClock, name: str, *, ended: bool) -> str:
    """What generation_task does for one brief, on the scaled clock; `ended` records the task as succeeded."""
    key = f"calls-{name}"
    now = clock()
    ledger.begin_submit(
        idempotency_key=key,
        brief_id=name,
        run_id="bench-calls",
        model=TASK_BODY["model"],
        price_credits=90,
        body=TASK_BODY,
        limits=CreditLimits(),
        wallet_credits=None,
        now=now,
    )
    task = client.create_generation(TASK_BODY, idempotency_key=key)
    ledger.record_task(
        key,
        task_id=task.id,
        status=task.status,
        reserved_credits=task.reserved_credits,
        final_credits=0,
        deadline_at=now + timedelta(minutes=30),
        next_poll_at=now + timedelta(seconds=FIRST_POLL_SECONDS),
        now=now,
    )
    if ended:
        ledger.update_status(task.id, status="succeeded", final_credits=90, refunded_credits=0, polled_at=now)
    return task.id


def _status(ledger: Ledger, task_id: str) -> str:
    record = ledger.find_by_task(task_id)
    if record is None:
        raise LookupError(f"task {task_id} is not in the benchmark's ledger")
    return record.status


def _polls(stack: BenchStack, task_ids: list[str]) -> list[int]:
    counts = stack.stats()["polls"]
    return [counts.get(task_id, 0) for task_id in task_ids]


def _poller_counts(stack: BenchStack, size: dict, tmp: Path) -> dict[str, float | int]:
    clock = _start(stack, size["time_scale"])
    ledger = Ledger(Ledger.default_url(tmp))
    with stack.client() as client:
        pending = [_submit(client, ledger, clock, f"pending-{i}", ended=False) for i in range(size["tasks"])]
        ended = [_submit(client, ledger, clock, f"ended-{i}", ended=True) for i in range(size["terminal_tasks"])]
        poller = TaskPoller(
            client, ledger, requests_per_second=REQUESTS_PER_SECOND, concurrency=CONCURRENCY, clock=clock
        )
        while any(_status(ledger, t) in ("queued", "processing") for t in pending):
            poller.poll_due()
            clock.sleep(TICK_SECONDS)
        at_end = _polls(stack, pending)
        watch_until = clock() + timedelta(seconds=WATCH_AFTER_END_SECONDS)
        while clock() < watch_until:
            poller.poll_due()
            clock.sleep(TICK_SECONDS)
    ledger.close()
    return {
        "polls_per_task": round(sum(at_end) / len(at_end), 2),
        "max_polls_for_a_task": max(at_end),
        "polls_after_terminal": sum(_polls(stack, pending)) - sum(at_end),
        "polls_of_already_terminal_tasks": sum(_polls(stack, ended)),
        "tasks": len(pending),
    }


def _baseline_polls_per_task(stack: BenchStack, size: dict) -> float:
    clock = _start(stack, size["time_scale"])
    with stack.client() as client:
        pending = {
            client.create_generation(TASK_BODY, idempotency_key=f"calls-baseline-{i}").id for i in range(size["tasks"])
        }
        task_ids = list(pending)
        while pending:
            pending = {t for t in pending if client.get_generation(t).status in ("queued", "processing")}
            clock.sleep(BASELINE_INTERVAL_SECONDS)
    counts = _polls(stack, task_ids)
    return round(sum(counts) / len(counts), 2)


def run(stack: BenchStack, quick: bool) -> BenchResult:
    size = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="rivya-bench-calls-") as tmp:
        counts = _poller_counts(stack, size, Path(tmp))
    baseline = _baseline_polls_per_task(stack, size)
    figures: dict[str, Figure | dict[str, Figure]] = {
        **counts,
        "baseline_polls_per_task": baseline,
        "generation_seconds": GENERATION_SECONDS,
        "time_scale": size["time_scale"],
    }
    return BenchResult(
        name="calls",
        setup=f"{size['tasks']} tasks of a {GENERATION_SECONDS:.0f} s generation and {size['terminal_tasks']} already "
        f"ended, ticks every {TICK_SECONDS:.0f} s, clocks {size['time_scale']:.0f}x; baseline polls every "
        f"{BASELINE_INTERVAL_SECONDS:.0f} s",
        figures=figures,
        goals=[
            (
                f"<= {GOAL_POLLS_PER_TASK} status calls per task ({counts['polls_per_task']}, "
                f"at most {counts['max_polls_for_a_task']})",
                counts["max_polls_for_a_task"] <= GOAL_POLLS_PER_TASK,
            ),
            (
                f"zero calls for tasks already ended ({counts['polls_of_already_terminal_tasks']} before, "
                f"{counts['polls_after_terminal']} after the end)",
                counts["polls_of_already_terminal_tasks"] == 0 and counts["polls_after_terminal"] == 0,
            ),
        ],
        bounds="the cadence itself: 2.5 s, then every 10 s, so a 60 s task ends on the 7th call",
    )
