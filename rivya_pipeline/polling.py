"""Polling pending tasks: shared by the sensor and the headless `run` command (no Dagster import).

One call works through the tasks that are due, concurrently but never above the configured request
rate, and stops early when its time budget runs out (the rest stay due for the next call). Every
side effect is a ledger update keyed by task id, so a call that dies half-way is simply repeated.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pyrate_limiter import Duration, Limiter, Rate

from .ledger import Ledger, TaskRecord
from .rivya import GenerationTask, NotFound, RivyaClient, RivyaError

log = logging.getLogger(__name__)

FIRST_POLL_SECONDS = 2.5


def next_poll_delay(age_seconds: float) -> float:
    """Rivya's guidance: first poll 2-3 s after submit, then every 5-10 s, slower for long video jobs."""
    if age_seconds < FIRST_POLL_SECONDS:
        return FIRST_POLL_SECONDS - age_seconds
    if age_seconds < 300:
        return 10.0
    if age_seconds < 900:
        return 20.0
    return 30.0


@dataclass
class PollReport:
    """What one pass saw; the sensor turns it into observations and run requests."""

    changed: list[tuple[TaskRecord, GenerationTask]] = field(default_factory=list)
    timed_out: list[TaskRecord] = field(default_factory=list)
    lost: list[TaskRecord] = field(default_factory=list)
    errors: list[tuple[TaskRecord, RivyaError]] = field(default_factory=list)
    polled: int = 0
    stopped_early: bool = False

    @property
    def succeeded(self) -> list[tuple[TaskRecord, GenerationTask]]:
        return [(r, t) for r, t in self.changed if t.status == "succeeded"]

    @property
    def failed(self) -> list[tuple[TaskRecord, GenerationTask]]:
        return [(r, t) for r, t in self.changed if t.status == "failed"]


class TaskPoller:
    def __init__(
        self,
        client: RivyaClient,
        ledger: Ledger,
        *,
        requests_per_second: float,
        concurrency: int,
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._concurrency = concurrency
        # The one place the poll rate is enforced: a sliding window shared by every worker thread.
        self._limiter = Limiter(Rate(max(1, int(requests_per_second)), Duration.SECOND))

    def poll_due(self, *, max_tasks: int = 1000, time_budget_seconds: float = 20.0) -> PollReport:
        started = time.monotonic()
        now = datetime.now(UTC)
        report = PollReport()
        due = self._ledger.due_for_poll(now, limit=max_tasks)
        to_poll = []
        for record in due:
            if record.deadline_at is not None and now >= record.deadline_at:
                self._ledger.mark_timed_out(record.task_id, now)
                report.timed_out.append(record)
            else:
                to_poll.append(record)

        def poll(record: TaskRecord) -> None:
            if time.monotonic() - started > time_budget_seconds:
                report.stopped_early = True
                return
            self._limiter.try_acquire("poll")
            self._poll_one(record, report)

        with ThreadPoolExecutor(max_workers=self._concurrency, thread_name_prefix="rivya-poll") as pool:
            list(pool.map(poll, to_poll))
        return report

    def _poll_one(self, record: TaskRecord, report: PollReport) -> None:
        polled_at = datetime.now(UTC)
        try:
            task = self._client.get_generation(record.task_id)
        except NotFound as exc:
            # The API no longer knows the task (another account's key, or it expired): stop polling it.
            self._ledger.update_status(
                record.task_id, status="failed", final_credits=0, refunded_credits=0,
                error_code=exc.code, error_message=exc.message, next_poll_at=None, polled_at=polled_at,
            )
            report.lost.append(record)
            return
        except RivyaError as exc:
            log.warning("poll of task %s failed, retrying next pass: %s", record.task_id, exc)
            self._ledger.update_status(
                record.task_id, status=record.status, final_credits=record.final_credits,
                refunded_credits=record.refunded_credits, next_poll_at=polled_at + timedelta(seconds=10),
                polled_at=polled_at,
            )
            report.errors.append((record, exc))
            return
        report.polled += 1
        age = (polled_at - record.submitted_at).total_seconds()
        next_poll = None if task.is_terminal else polled_at + timedelta(seconds=next_poll_delay(age))
        self._ledger.update_status(
            record.task_id,
            status=task.status,
            final_credits=task.final_credits,
            refunded_credits=task.refunded_credits,
            error_code=task.error.code if task.error else None,
            error_message=task.error.message if task.error else None,
            next_poll_at=next_poll,
            polled_at=polled_at,
        )
        if task.status != record.status:
            report.changed.append((record, task))


class TaskDeadlineExceeded(Exception):
    """The task is still not terminal at its deadline: reported, never polled forever."""


def wait_for_terminal(
    client: RivyaClient, task_id: str, *, submitted_at: datetime, deadline_at: datetime
) -> GenerationTask:
    """For a step that needs the result now (a manual materialization): same cadence, bounded by the deadline."""
    while True:
        age = (datetime.now(UTC) - submitted_at).total_seconds()
        if age < FIRST_POLL_SECONDS:
            time.sleep(FIRST_POLL_SECONDS - age)
        task = client.get_generation(task_id)
        if task.is_terminal:
            return task
        now = datetime.now(UTC)
        if now >= deadline_at:
            raise TaskDeadlineExceeded(f"task {task_id} is still {task.status} at its deadline {deadline_at:%H:%M:%S}Z")
        time.sleep(min(next_poll_delay((now - submitted_at).total_seconds()), (deadline_at - now).total_seconds()))
