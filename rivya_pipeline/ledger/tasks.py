"""Task state: every paid task from its accepted create to its stored video, polled in bounded batches."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Select, and_, bindparam, func, select, update

from ..batching import chunks
from ..rivya.models import PENDING_STATUSES, TERMINAL_STATUSES, TaskStatus
from ..settings import utc_now
from .database import LedgerPart
from .schema import tasks


@dataclass(frozen=True)
class TaskRecord:
    """One paid (or attempted) task."""

    idempotency_key: str
    brief_id: str
    run_id: str
    model: str
    price_credits: int
    task_id: str | None
    status: str  # a TaskStatus
    reserved_credits: int
    final_credits: int
    refunded_credits: int
    error_code: str | None
    error_message: str | None
    submitted_at: datetime
    deadline_at: datetime | None
    next_poll_at: datetime | None
    last_polled_at: datetime | None
    poll_count: int
    stored_uri: str | None
    stored_sha256: str | None
    stored_at: datetime | None
    body: dict[str, Any]  # the request as sent (and re-sent): model, prompt, params
    poll_failures: int = 0
    store_queued_at: datetime | None = None
    store_due_at: datetime | None = None  # None: not waiting to be stored (stored, given up, or not succeeded)
    store_attempts: int = 0
    store_error: str | None = None
    store_gave_up_at: datetime | None = None

    @property
    def accepted_task_id(self) -> str:
        """The task id of a row whose create Rivya answered: every row that is polled or stored has one."""
        if self.task_id is None:
            raise LookupError(f"ledger row {self.idempotency_key} has no task: its create was never answered")
        return self.task_id


@dataclass(frozen=True)
class StatusUpdate:
    """What one status poll saw, for `TaskTracker.update_statuses`."""

    task_id: str
    status: str
    final_credits: int
    refunded_credits: int
    polled_at: datetime
    next_poll_at: datetime | None = None  # None: stop polling (terminal, or lost)
    error_code: str | None = None
    error_message: str | None = None
    poll_failures: int = 0  # transient failures in a row, this poll's included (0: it was answered)


@dataclass(frozen=True)
class StoreRetryPolicy:
    """How long a failed store waits before the next attempt, and until when a video is tried at all.

    Storing is free, so it is retried for as long as the result can still be fetched: `window` from the task's
    success (Rivya does not document how long result URLs live; 24 h is our default). The waits double from
    `first_wait` up to `max_wait`, so an outage of an afternoon costs a few dozen attempts, not thousands."""

    first_wait: timedelta = timedelta(minutes=1)
    max_wait: timedelta = timedelta(minutes=30)
    window: timedelta = timedelta(hours=24)

    def wait_after(self, attempts: int) -> timedelta:
        """The wait after the `attempts`-th failed attempt (1, 2, 4 ... times first_wait, capped)."""
        return min(self.first_wait * 2 ** min(max(attempts - 1, 0), 30), self.max_wait)


KEYS_PER_STATEMENT = 500  # bound values per statement, well below SQLite's limit

_RECORD_FIELDS = tuple(f.name for f in fields(TaskRecord))


def _record(row: Any) -> TaskRecord:
    mapping = row._mapping
    return TaskRecord(**{name: mapping[name] for name in _RECORD_FIELDS} | {"body": json.loads(mapping["body"])})


class TaskTracker(LedgerPart):
    """Lookups of tasks, and what the poller and the store step record about them."""

    # -- lookups ------------------------------------------------------------------------------------

    def _one(self, *conditions: Any, newest_first: bool = False) -> TaskRecord | None:
        query = select(tasks).where(*conditions)
        if newest_first:
            query = query.order_by(tasks.c.submitted_at.desc(), tasks.c.idempotency_key.desc()).limit(1)
        with self._db.read() as conn:
            row = conn.execute(query).first()
        return None if row is None else _record(row)

    def _many(self, query: Select[Any]) -> list[TaskRecord]:
        with self._db.read() as conn:
            return [_record(row) for row in conn.execute(query)]

    def get(self, idempotency_key: str) -> TaskRecord | None:
        return self._one(tasks.c.idempotency_key == idempotency_key)

    def get_many(self, idempotency_keys: Sequence[str]) -> dict[str, TaskRecord]:
        """The rows of these keys (those that exist), by key: a read per KEYS_PER_STATEMENT keys, not one per key."""
        found: dict[str, TaskRecord] = {}
        for chunk in chunks(idempotency_keys, KEYS_PER_STATEMENT):
            found |= {r.idempotency_key: r for r in self._many(select(tasks).where(tasks.c.idempotency_key.in_(chunk)))}
        return found

    def find_by_task(self, task_id: str) -> TaskRecord | None:
        return self._one(tasks.c.task_id == task_id)

    def latest_for_brief(self, brief_id: str) -> TaskRecord | None:
        return self._one(tasks.c.brief_id == brief_id, newest_first=True)

    def tasks_of_briefs(self, brief_ids: Sequence[str]) -> dict[str, list[TaskRecord]]:
        """Every task of these briefs (those that have any), by brief: a read per KEYS_PER_STATEMENT briefs, through
        the index on (brief_id, submitted_at)."""
        found: dict[str, list[TaskRecord]] = {}
        for chunk in chunks(brief_ids, KEYS_PER_STATEMENT):
            for record in self._many(select(tasks).where(tasks.c.brief_id.in_(chunk))):
                found.setdefault(record.brief_id, []).append(record)
        return found

    def count_by_status(self) -> dict[str, int]:
        with self._db.read() as conn:
            rows = conn.execute(select(tasks.c.status, func.count()).group_by(tasks.c.status))
            return {status: count for status, count in rows}

    # -- polling support for the sensor -------------------------------------------------------------

    def due_for_poll(self, now: datetime, limit: int) -> list[TaskRecord]:
        """Tasks waiting on Rivya whose next poll is due, most overdue first (served by the status index)."""
        return self._many(
            select(tasks)
            .where(
                tasks.c.status.in_(PENDING_STATUSES),
                tasks.c.task_id.is_not(None),
                tasks.c.next_poll_at <= now,
            )
            .order_by(tasks.c.next_poll_at, tasks.c.idempotency_key)
            .limit(limit)
        )

    def update_status(
        self,
        task_id: str,
        *,
        status: str,
        final_credits: int,
        refunded_credits: int,
        error_code: str | None = None,
        error_message: str | None = None,
        next_poll_at: datetime | None = None,
        polled_at: datetime,
    ) -> None:
        """Record one poll (see `update_statuses`)."""
        self.update_statuses(
            [
                StatusUpdate(
                    task_id, status, final_credits, refunded_credits, polled_at, next_poll_at, error_code, error_message
                )
            ]
        )

    def update_statuses(self, updates: Sequence[StatusUpdate]) -> None:
        """Record many polls in one transaction and one executemany per kind of update.

        A sensor tick records up to a thousand polls: a commit per poll made the ledger the slowest part
        of the tick, and one statement per poll made the writing thread queue for the GIL once per row
        while the poll threads held it. A stale poll that reports queued/processing never undoes a
        terminal status.
        """
        if not updates:
            return
        statement = update(tasks).values(
            status=bindparam("new_status"),
            final_credits=bindparam("final_credits"),
            refunded_credits=bindparam("refunded_credits"),
            error_code=bindparam("error_code"),
            error_message=bindparam("error_message"),
            next_poll_at=bindparam("next_poll_at"),
            last_polled_at=bindparam("polled_at"),
            poll_count=tasks.c.poll_count + 1,
            poll_failures=bindparam("poll_failures"),
            updated_at=bindparam("polled_at"),
        )
        by_task = tasks.c.task_id == bindparam("polled_task_id")
        # Shallow copies: dataclasses.asdict deep-copies every field of every row, on the poller's hot path.
        pending = [dict(vars(u)) for u in updates if u.status in PENDING_STATUSES]
        final = [dict(vars(u)) for u in updates if u.status not in PENDING_STATUSES]
        for rows in (pending, final):
            for row in rows:
                row["polled_task_id"], row["new_status"] = row.pop("task_id"), row.pop("status")
        with self._db.write() as conn:
            if pending:
                not_terminal = and_(*(tasks.c.status != status for status in TERMINAL_STATUSES))  # executemany: no IN
                conn.execute(statement.where(by_task, not_terminal), pending)
            if final:
                conn.execute(statement.where(by_task), final)
                succeeded = [u.task_id for u in updates if u.status == TaskStatus.SUCCEEDED]
                _queue_for_store(conn, succeeded, max(u.polled_at for u in updates))
            ids = {u.task_id for u in updates}
            known = set(conn.execute(select(tasks.c.task_id).where(tasks.c.task_id.in_(ids))).scalars())
            if ids - known:
                raise LookupError(f"no ledger row for task(s) {', '.join(sorted(ids - known))}")

    def mark_timed_out(self, task_id: str, now: datetime) -> None:
        """Stop polling a task that passed its deadline: it is reported, not polled forever.

        A task that reached a terminal status in the meantime keeps it.
        """
        with self._db.write() as conn:
            updated = conn.execute(
                update(tasks)
                .where(tasks.c.task_id == task_id, tasks.c.status.in_(PENDING_STATUSES))
                .values(
                    status=TaskStatus.TIMED_OUT,
                    error_code=TaskStatus.TIMED_OUT,
                    error_message="no terminal status from Rivya before the task's deadline",
                    next_poll_at=None,
                    updated_at=now,
                )
            )
            if updated.rowcount == 0:
                _require_task(conn, task_id)

    def unanswered_submits(self, *, sent_after: datetime, sent_before: datetime, limit: int) -> list[TaskRecord]:
        """Creates sent but never answered (still "submitting": the run crashed or gave up), oldest first."""
        return self._many(
            select(tasks)
            .where(
                tasks.c.status == TaskStatus.SUBMITTING,
                tasks.c.submitted_at > sent_after,
                tasks.c.submitted_at <= sent_before,
            )
            .order_by(tasks.c.submitted_at, tasks.c.idempotency_key)
            .limit(limit)
        )

    # -- storing ------------------------------------------------------------------------------------

    def due_for_store(self, now: datetime, limit: int) -> list[TaskRecord]:
        """Videos whose store is due, longest waiting first (their URLs may expire). Served by the queue's index,
        which holds only the videos still waiting: stored and given-up ones never take a place in it."""
        return self._many(
            select(tasks)
            .where(tasks.c.store_due_at <= now)
            .order_by(tasks.c.store_due_at, tasks.c.idempotency_key)
            .limit(limit)
        )

    def gave_up_storing(self, limit: int = 1000, since: datetime | None = None) -> list[TaskRecord]:
        """Paid videos never stored because their store window ran out (or the result was refused), newest first;
        given up on `since` (None: ever), through the index on store_gave_up_at."""
        return self._many(
            select(tasks)
            .where(
                tasks.c.store_gave_up_at >= since if since else tasks.c.store_gave_up_at.is_not(None),
                tasks.c.stored_at.is_(None),
            )
            .order_by(tasks.c.store_gave_up_at.desc(), tasks.c.idempotency_key)
            .limit(limit)
        )

    def record_store_failure(
        self, task_id: str, *, error: str, retry: StoreRetryPolicy, give_up: bool = False, now: datetime | None = None
    ) -> TaskRecord | None:
        """Count a failed store of a succeeded task and say when the next one is due; past the store window (or with
        `give_up`, for a failure no retry can change) the video leaves the queue and is reported instead. A video
        stored meanwhile (by another run), and a task that did not succeed, stay as they are; None: no such task."""
        now = now or utc_now()
        with self._db.write() as conn:
            row = conn.execute(select(tasks).where(tasks.c.task_id == task_id)).first()
            if row is None:
                return None
            record = _record(row)
            if record.stored_at is None and record.status == TaskStatus.SUCCEEDED:
                attempts = record.store_attempts + 1
                next_due = now + retry.wait_after(attempts)
                window_ends = (record.store_queued_at or now) + retry.window
                gives_up = give_up or next_due > window_ends
                conn.execute(
                    update(tasks)
                    .where(tasks.c.task_id == task_id)
                    .values(
                        store_attempts=attempts,
                        store_error=error,
                        store_due_at=None if gives_up else next_due,
                        store_gave_up_at=now if gives_up else None,
                        store_queued_at=record.store_queued_at or now,
                        updated_at=now,
                    )
                )
            return _record(conn.execute(select(tasks).where(tasks.c.task_id == task_id)).one())

    def mark_stored(self, task_id: str, *, uri: str, sha256: str, now: datetime | None = None) -> None:
        now = now or utc_now()
        with self._db.write() as conn:
            updated = conn.execute(
                update(tasks)
                .where(tasks.c.task_id == task_id)
                .values(
                    stored_uri=uri,
                    stored_sha256=sha256,
                    stored_at=now,
                    updated_at=now,
                    store_due_at=None,
                    store_gave_up_at=None,
                )
            )
            if updated.rowcount == 0:
                raise LookupError(f"no ledger row for task {task_id}")


def _queue_for_store(conn: Connection, task_ids: Sequence[str], now: datetime) -> None:
    """A task's first recorded success puts its video in the store queue, due at once; later records of the same
    success (a replayed create, a store step that saw it first) leave its place and its attempts alone."""
    if task_ids:
        conn.execute(
            update(tasks)
            .where(
                tasks.c.task_id.in_(task_ids),
                tasks.c.status == TaskStatus.SUCCEEDED,
                tasks.c.stored_at.is_(None),
                tasks.c.store_queued_at.is_(None),
            )
            .values(store_queued_at=now, store_due_at=now)
        )


def _require_task(conn: Connection, task_id: str) -> None:
    if conn.execute(select(tasks.c.task_id).where(tasks.c.task_id == task_id)).first() is None:
        raise LookupError(f"no ledger row for task {task_id}")
