"""Polling pending tasks: shared by the sensor and the headless `run` command (no Dagster import).

One call works through the tasks that are due, concurrently but never above the configured request
rate, and stops early when its time budget runs out (the rest stay due for the next call). Every
side effect is a ledger update keyed by task id, so a call that dies half-way is simply repeated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pyrate_limiter import Duration, Limiter, Rate

from .ledger import StatusUpdate, TaskRecord, TaskTracker
from .rivya import GenerationTask, NotFound, RivyaClient, RivyaError, TaskStatus
from .settings import utc_now

log = logging.getLogger(__name__)

FIRST_POLL_SECONDS = 2.5
# Answers recorded per ledger transaction: one commit per task made the ledger the slowest part of a tick.
WRITE_BATCH = 100
# A task whose poll failed (429, 5xx, timeout) is asked again after 10 s, then 20, 40 ... up to 5 minutes.
RETRY_POLL_SECONDS = 10.0
MAX_RETRY_POLL_SECONDS = 300.0
# This many transient failures in a row, and no answer between them: the API is down, the pass stops.
FAILURES_THAT_STOP_A_PASS = 5


def retry_poll_delay(failures: int) -> float:
    """The wait before the next poll of a task whose last `failures` polls in a row failed transiently."""
    return min(RETRY_POLL_SECONDS * 2 ** min(max(failures - 1, 0), 30), MAX_RETRY_POLL_SECONDS)


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
    api_unavailable: bool = False  # the pass stopped because every recent poll failed: the rest wait for later

    @property
    def succeeded(self) -> list[tuple[TaskRecord, GenerationTask]]:
        return [(r, t) for r, t in self.changed if t.status == TaskStatus.SUCCEEDED]

    @property
    def failed(self) -> list[tuple[TaskRecord, GenerationTask]]:
        return [(r, t) for r, t in self.changed if t.status == TaskStatus.FAILED]


_limiters: dict[tuple[str, int], Limiter] = {}
_limiters_lock = threading.Lock()


def poll_rate_limiter(base_url: str, requests_per_second: float) -> Limiter:
    """The one place the poll rate is enforced: a sliding window per API and rate, shared by every poll thread
    of this process. Shared across pollers too: the sensor builds its resources (so a poller) anew on every
    tick, and back-to-back ticks with a window each could together send twice the rate."""
    key = (base_url, max(1, int(requests_per_second)))
    with _limiters_lock:
        if key not in _limiters:
            _limiters[key] = Limiter(Rate(key[1], Duration.SECOND))
        return _limiters[key]


@dataclass
class _TickBudget:
    """A poll starts only if, at the pace of the slowest poll and the slowest ledger write seen so far in this
    call, it can be answered and recorded within the budget: what is in flight when time runs out must not
    carry the call past it."""

    deadline: float
    slowest_poll_seconds: float = 0.0
    slowest_write_seconds: float = 0.0

    def left_for_next_poll(self) -> float:
        return self.deadline - time.monotonic() - self.slowest_poll_seconds - self.slowest_write_seconds

    def polled(self, seconds: float) -> None:
        self.slowest_poll_seconds = max(self.slowest_poll_seconds, seconds)

    def wrote(self, seconds: float) -> None:
        self.slowest_write_seconds = max(self.slowest_write_seconds, seconds)


class _OutageBreaker:
    """Stops a pass once FAILURES_THAT_STOP_A_PASS polls in a row failed transiently, so a tick does not spend its
    time budget on a dead API; an answer in between resets the count. Shared by the poll threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures_in_a_row = 0

    @property
    def open(self) -> bool:
        with self._lock:
            return self._failures_in_a_row >= FAILURES_THAT_STOP_A_PASS

    def record(self, answered: bool) -> None:
        with self._lock:
            self._failures_in_a_row = 0 if answered else self._failures_in_a_row + 1


@dataclass(frozen=True)
class _Polled:
    """One answered (or failed) status request, handed from a worker thread to the writer."""

    record: TaskRecord
    polled_at: datetime
    answer: GenerationTask | RivyaError


class _ConnectionPerThread:
    """A client over a connection of its own for each poll thread, opened as the thread starts, all closed together.

    One pool shared by the threads costs every poll the pool's bookkeeping: at each request and each response,
    httpcore rescans all the pool's connections under its lock and polls every idle socket (encode/httpcore#1035).
    """

    def __init__(self, template: RivyaClient) -> None:
        self._template = template
        self._local = threading.local()
        self._opened: list[RivyaClient] = []

    def open(self) -> None:
        """In each new worker thread (the pool's initializer)."""
        self._local.client = self._template.with_own_connection()
        self._opened.append(self._local.client)

    def get_generation(self, task_id: str) -> GenerationTask:
        return self._local.client.get_generation(task_id)

    def close(self) -> None:
        for client in self._opened:
            client.close()


class TaskPoller:
    """Polls due tasks with `concurrency` worker threads sharing one rate limiter, each over a connection of its
    own; the calling thread records the answers in the ledger, a batch per transaction."""

    def __init__(
        self,
        client: RivyaClient,
        ledger: TaskTracker,
        *,
        requests_per_second: float,
        concurrency: int,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """`clock` gives the time the cadence is reckoned in (a benchmark runs it faster, with the emulator's)."""
        self._client = client
        self._ledger = ledger
        self._concurrency = concurrency
        self._clock = clock or utc_now
        self._limiter = poll_rate_limiter(client.base_url, requests_per_second)

    def poll_due(self, *, max_tasks: int = 1000, time_budget_seconds: float = 20.0) -> PollReport:
        budget = _TickBudget(deadline=time.monotonic() + time_budget_seconds)
        now = self._clock()
        report = PollReport()
        due = self._ledger.due_for_poll(now, limit=max_tasks)
        to_poll = []
        for record in due:
            if record.deadline_at is not None and now >= record.deadline_at:
                self._ledger.mark_timed_out(record.accepted_task_id, now)
                report.timed_out.append(record)
            else:
                to_poll.append(record)

        connections = _ConnectionPerThread(self._client)
        breaker = _OutageBreaker()
        probe_failed = False
        try:
            with ThreadPoolExecutor(
                max_workers=self._concurrency, thread_name_prefix="rivya-poll", initializer=connections.open
            ) as pool:
                # One poll first, alone: while the API is down, a pass costs that one request, not a thread each.
                self._poll(pool, connections, to_poll[:1], budget, breaker, report)
                probe_failed = bool(report.errors)
                if not probe_failed:
                    self._poll(pool, connections, to_poll[1:], budget, breaker, report)
        finally:
            connections.close()
        if breaker.open or probe_failed:
            report.api_unavailable = report.stopped_early = True
            log.warning("Rivya answered no poll of this pass; %d due task(s) wait for the next", len(to_poll))
        return report

    def _poll(
        self,
        pool: ThreadPoolExecutor,
        connections: _ConnectionPerThread,
        records: list[TaskRecord],
        budget: _TickBudget,
        breaker: _OutageBreaker,
        report: PollReport,
    ) -> None:
        futures = [pool.submit(self._fetch, connections, record, budget, breaker) for record in records]
        batch: list[StatusUpdate] = []
        for future in as_completed(futures):
            polled = future.result()
            if polled is None:
                report.stopped_early = True
                continue
            batch.append(self._status_update(polled, report))
            if len(batch) >= WRITE_BATCH:
                self._write(batch, budget)
                batch = []
        self._write(batch, budget)

    def _write(self, batch: list[StatusUpdate], budget: _TickBudget) -> None:
        started = time.monotonic()
        self._ledger.update_statuses(batch)
        budget.wrote(time.monotonic() - started)

    def _fetch(
        self, connections: _ConnectionPerThread, record: TaskRecord, budget: _TickBudget, breaker: _OutageBreaker
    ) -> _Polled | None:
        """In a worker thread: wait for the rate limiter, then ask for the task; None when out of time, or when the
        API looks down (the task stays due as it is)."""
        left = budget.left_for_next_poll()
        if left <= 0 or breaker.open or not self._limiter.try_acquire("poll", timeout=left):
            return None
        polled_at, started = self._clock(), time.monotonic()
        answer: GenerationTask | RivyaError
        try:
            answer = connections.get_generation(record.accepted_task_id)
        except RivyaError as exc:
            answer = exc
        budget.polled(time.monotonic() - started)
        breaker.record(answered=not isinstance(answer, RivyaError) or isinstance(answer, NotFound))
        return _Polled(record, polled_at, answer)

    def _status_update(self, polled: _Polled, report: PollReport) -> StatusUpdate:
        record, polled_at, answer = polled.record, polled.polled_at, polled.answer
        if isinstance(answer, NotFound):
            # The API no longer knows the task (another account's key, or it expired): stop polling it.
            report.lost.append(record)
            return StatusUpdate(
                record.accepted_task_id,
                TaskStatus.FAILED,
                0,
                0,
                polled_at,
                error_code=answer.code,
                error_message=answer.message,
            )
        if isinstance(answer, RivyaError):  # a transient failure: asked again later, later after each in a row
            failures = record.poll_failures + 1
            delay = retry_poll_delay(failures)
            log.warning(
                "poll of task %s failed (%d in a row), next in %.0fs: %s", record.task_id, failures, delay, answer
            )
            report.errors.append((record, answer))
            return StatusUpdate(
                record.accepted_task_id,
                record.status,
                record.final_credits,
                record.refunded_credits,
                polled_at,
                next_poll_at=polled_at + timedelta(seconds=delay),
                poll_failures=failures,
            )
        task = answer
        report.polled += 1
        if task.status != record.status:
            report.changed.append((record, task))
        age = (polled_at - record.submitted_at).total_seconds()
        return StatusUpdate(
            record.accepted_task_id,
            task.status,
            task.final_credits,
            task.refunded_credits,
            polled_at,
            next_poll_at=None if task.is_terminal else polled_at + timedelta(seconds=next_poll_delay(age)),
            error_code=task.error.code if task.error else None,
            error_message=task.error.message if task.error else None,
        )


class TaskDeadlineExceeded(Exception):
    """The task is still not terminal at its deadline: reported, never polled forever."""


def wait_for_terminal(
    client: RivyaClient, task_id: str, *, submitted_at: datetime, deadline_at: datetime
) -> GenerationTask:
    """For a step that needs the result now (a manual materialization): same cadence, bounded by the deadline."""
    while True:
        age = (utc_now() - submitted_at).total_seconds()
        if age < FIRST_POLL_SECONDS:
            time.sleep(FIRST_POLL_SECONDS - age)
        task = client.get_generation(task_id)
        if task.is_terminal:
            return task
        now = utc_now()
        if now >= deadline_at:
            raise TaskDeadlineExceeded(f"task {task_id} is still {task.status} at its deadline {deadline_at:%H:%M:%S}Z")
        time.sleep(min(next_poll_delay((now - submitted_at).total_seconds()), (deadline_at - now).total_seconds()))
