"""The spend ledger: one durable, transactional record shared by every Dagster run process and the sensor.

It does two jobs no in-process object can do across processes:

- **Guard spend.** `begin_submit` decides, in one serialized transaction, whether a paid create may go out
  (per-run cap, rolling 24 h cap, wallet floor) and reserves its price before any HTTP call, so 8 runs that
  submit at once cannot overshoot a cap together.
- **Track every paid task** from "submitting" to its stored video, so a crashed step re-attaches to its task
  (or replays the identical create under the same Idempotency-Key) instead of paying twice, and the sensor
  polls a bounded batch of due tasks.

One code path (SQLAlchemy 2 Core) serves SQLite (default: a file in DAGSTER_HOME) and PostgreSQL. Budget
decisions are serialized with `BEGIN IMMEDIATE` on SQLite and `pg_advisory_xact_lock` on PostgreSQL; both
last only for the transaction, and no lock is ever held across a create or a poll.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    URL,
    Connection,
    Date,
    Engine,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    make_url,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from .ledger_schema import SCHEMA_VERSION, brief_versions, ledger_meta, metadata, tasks

DEFAULT_LEDGER_FILE = "rivya_ledger.sqlite"
# Key of the PostgreSQL advisory lock that serializes budget decisions ("RivyaLdg" in ASCII).
SUBMIT_LOCK_ID = 0x52697679614C6467
# How long a process waits for another one's budget transaction (SQLite busy timeout, PostgreSQL
# lock_timeout) before giving up with an error rather than hanging a run.
LOCK_WAIT_SECONDS = 30

POLLABLE_STATUSES = ("queued", "processing")
TERMINAL_STATUSES = ("succeeded", "failed")
# A task counts against the caps unless Rivya gave its credits back (failed tasks are refunded in full).
COUNTS_AGAINST_CAPS = and_(tasks.c.status != "failed", tasks.c.refunded_credits == 0)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CreditLimits:
    max_credits_per_run: int | None = None  # None = no cap
    max_credits_per_day: int | None = None  # rolling 24 h
    min_wallet_credits: int = 0  # floor that must remain in the wallet after this submit


class BudgetExceeded(Exception):
    """A submit would cross a credit limit; `limit` is "per_run", "per_day" or "wallet_floor"."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(limit, message)  # both in args, so the error survives pickling between processes
        self.limit = limit
        self.message = message

    def __str__(self) -> str:
        return self.message


class StaleSubmission(Exception):
    """A create whose answer was lost is older than Rivya's idempotency window: resending could pay twice."""


# Rivya keeps idempotency keys for 24 h; past that a resent body would be a new, paid task.
RESEND_WINDOW = timedelta(hours=23)


@dataclass(frozen=True)
class SubmitDecision:
    action: Literal["new", "reattach", "resend"]
    idempotency_key: str
    body: dict[str, Any]  # "resend": the body stored by the first attempt, so the idempotent replay matches
    task_id: str | None  # set for "reattach"


@dataclass(frozen=True)
class TaskRecord:
    """One paid (or attempted) task."""

    idempotency_key: str
    brief_id: str
    run_id: str
    model: str
    price_credits: int
    task_id: str | None
    status: str  # "submitting" | "queued" | "processing" | "succeeded" | "failed" | "timed_out"
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


@dataclass(frozen=True)
class StatusUpdate:
    """What one status poll saw, for `Ledger.update_statuses`."""

    task_id: str
    status: str
    final_credits: int
    refunded_credits: int
    polled_at: datetime
    next_poll_at: datetime | None = None  # None: stop polling (terminal, or lost)
    error_code: str | None = None
    error_message: str | None = None


_RECORD_FIELDS = tuple(f.name for f in fields(TaskRecord))


def _record(row: Any) -> TaskRecord:
    mapping = row._mapping
    return TaskRecord(**{name: mapping[name] for name in _RECORD_FIELDS} | {"body": json.loads(mapping["body"])})


class Ledger:
    """The ledger at a SQLAlchemy URL; creates its tables on first use. Safe to open from many processes."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        if self._is_sqlite:
            self._engine = self._sqlite_engine(parsed)
        else:
            if parsed.drivername == "postgresql":
                # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; psycopg2 is the driver that
                # dagster-postgres already brings.
                parsed = parsed.set(drivername="postgresql+psycopg2")
            self._engine = create_engine(
                parsed,
                isolation_level="READ COMMITTED",  # explicit, whatever the server's default: see _serialized
                pool_pre_ping=True,
                connect_args={"connect_timeout": LOCK_WAIT_SECONDS},
            )
        # Reads need no write lock: on SQLite they start a plain deferred transaction (WAL lets them run
        # beside a writer); on PostgreSQL the option is ignored.
        self._reader = self._engine.execution_options(sqlite_begin="DEFERRED")
        self._create_schema()

    @classmethod
    def default_url(cls, dagster_home: str | Path) -> str:
        """A SQLite file inside DAGSTER_HOME: zero setup, and it lives as long as the Dagster instance."""
        path = Path(dagster_home).expanduser().resolve() / DEFAULT_LEDGER_FILE
        return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)

    def close(self) -> None:
        self._engine.dispose()

    # -- connections and locking ------------------------------------------------------------------

    @staticmethod
    def _sqlite_engine(url: URL) -> Engine:
        """SQLAlchemy's documented recipe for pysqlite transaction control, with BEGIN IMMEDIATE for writes.

        pysqlite's own BEGIN handling is switched off (isolation_level None) and SQLAlchemy emits the BEGIN,
        so every write transaction takes SQLite's write lock at its start: two processes can never both
        read the same spend and then both insert. WAL lets readers (the sensor, reports) run beside it.
        """
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": LOCK_WAIT_SECONDS})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            dbapi_connection.execute("PRAGMA journal_mode=WAL")

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            deferred = conn.get_execution_options().get("sqlite_begin") == "DEFERRED"
            conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

        return engine

    @contextmanager
    def _serialized(self) -> Iterator[Connection]:
        """A write transaction that no other process's serialized transaction overlaps.

        SQLite: BEGIN IMMEDIATE already holds the database's single write lock. PostgreSQL: a
        transaction-scoped advisory lock, released by COMMIT/ROLLBACK; READ COMMITTED (set on the engine) gives
        every statement after the lock a fresh snapshot, so it sees what the previous holder committed.
        """
        with self._engine.begin() as conn:
            if not self._is_sqlite:
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_WAIT_SECONDS}s'")
                conn.execute(select(func.pg_advisory_xact_lock(SUBMIT_LOCK_ID)))
            yield conn

    def _create_schema(self) -> None:
        """Create missing tables and check the schema version, serialized so concurrent first opens agree."""
        with self._serialized() as conn:
            metadata.create_all(conn)
            found = conn.execute(select(ledger_meta.c.value).where(ledger_meta.c.key == "schema_version")).scalar()
            if found is None:
                conn.execute(insert(ledger_meta).values(key="schema_version", value=SCHEMA_VERSION))
            elif found != SCHEMA_VERSION:
                raise RuntimeError(
                    f"ledger schema version {found} is not the version {SCHEMA_VERSION} this code understands"
                )

    # -- spend guard and crash-safe submit --------------------------------------------------------

    def begin_submit(
        self,
        *,
        idempotency_key: str,
        brief_id: str,
        run_id: str,
        model: str,
        price_credits: int,
        body: dict[str, Any],
        limits: CreditLimits,
        wallet_credits: Callable[[], int] | None,
        now: datetime | None = None,
    ) -> SubmitDecision:
        """Decide what to send for this key, reserving its price when it is new. Raises BudgetExceeded.

        - A row with a task id: "reattach" to that task; nothing is checked or reserved again.
        - A row without one: an earlier attempt crashed or lost its answer; "resend" its stored body under
          the same key (Rivya returns the original task and charges nothing twice). Its price already counts.
          Past RESEND_WINDOW Rivya may have forgotten the key, so that raises StaleSubmission instead.
        - No row: check the caps, insert a "submitting" row and answer "new".

        The wallet (an HTTP GET) is read inside the lock, and only when a floor is set. That serializes
        submits for one short GET, which is acceptable because creates are rate-limited anyway, and it is
        the only race-free order: the in-flight ("submitting") prices are read first, then the wallet. A
        row that is no longer in flight had its create answered, so Rivya charged it, before that read, and
        the wallet fetched afterwards already shows the charge; a row still in flight is subtracted whether
        or not Rivya charged it yet (conservative). A wallet read before the lock could predate a charge
        whose row is no longer in flight, and would then count those credits as available.
        """
        if limits.min_wallet_credits > 0 and wallet_credits is None:
            raise ValueError("wallet_credits: needed to enforce min_wallet_credits")
        now = now or utc_now()
        with self._serialized() as conn:
            row = conn.execute(
                select(tasks.c.task_id, tasks.c.body, tasks.c.submitted_at).where(
                    tasks.c.idempotency_key == idempotency_key
                )
            ).first()
            if row is not None:
                if row.task_id is not None:
                    return SubmitDecision("reattach", idempotency_key, json.loads(row.body), row.task_id)
                if now - row.submitted_at > RESEND_WINDOW:
                    raise StaleSubmission(
                        f"the create sent at {row.submitted_at:%Y-%m-%d %H:%M}Z never got an answer and is past "
                        "Rivya's 24 h idempotency window, so resending it could pay twice; check the task list in "
                        "Rivya, then bump `regenerate` in the brief to submit anew"
                    )
                return SubmitDecision("resend", idempotency_key, json.loads(row.body), None)
            self._check_limits(conn, run_id=run_id, price=price_credits, limits=limits, wallet=wallet_credits, now=now)
            conn.execute(
                insert(tasks).values(
                    idempotency_key=idempotency_key,
                    brief_id=brief_id,
                    run_id=run_id,
                    model=model,
                    price_credits=price_credits,
                    body=json.dumps(body),
                    status="submitting",
                    submitted_at=now,
                    updated_at=now,
                )
            )
        return SubmitDecision("new", idempotency_key, body, None)

    @staticmethod
    def _check_limits(
        conn: Connection,
        *,
        run_id: str,
        price: int,
        limits: CreditLimits,
        wallet: Callable[[], int] | None,
        now: datetime,
    ) -> None:
        def held(*conditions: Any) -> int:
            total = select(func.coalesce(func.sum(tasks.c.price_credits), 0)).where(*conditions)
            return int(conn.execute(total).scalar_one())

        cap = limits.max_credits_per_run
        if cap is not None:
            spent = held(COUNTS_AGAINST_CAPS, tasks.c.run_id == run_id)
            if spent + price > cap:
                raise BudgetExceeded(
                    "per_run",
                    f"per-run credit limit: {spent} of {cap} credits already reserved in this run, "
                    f"this task costs {price}",
                )
        cap = limits.max_credits_per_day
        if cap is not None:
            spent = held(COUNTS_AGAINST_CAPS, tasks.c.submitted_at > now - timedelta(hours=24))
            if spent + price > cap:
                raise BudgetExceeded(
                    "per_day",
                    f"per-day credit limit: {spent} of {cap} credits reserved in the last 24 h, "
                    f"this task costs {price}",
                )
        floor = limits.min_wallet_credits
        if floor > 0 and wallet is not None:
            in_flight = held(tasks.c.status == "submitting")  # read BEFORE the wallet: see begin_submit
            available = wallet()
            if available - in_flight - price < floor:
                raise BudgetExceeded(
                    "wallet_floor",
                    f"wallet floor: {available} credits in the wallet, {in_flight} held by submits in flight, "
                    f"this task costs {price}, and at least {floor} must remain",
                )

    def record_task(
        self,
        idempotency_key: str,
        *,
        task_id: str,
        status: str,
        reserved_credits: int,
        final_credits: int,
        deadline_at: datetime | None,
        next_poll_at: datetime | None,
        now: datetime | None = None,
    ) -> None:
        """Attach Rivya's answer to the create: from now on the task is polled, never created again."""
        values = dict(
            task_id=task_id,
            status=status,
            reserved_credits=reserved_credits,
            final_credits=final_credits,
            deadline_at=deadline_at,
            next_poll_at=next_poll_at,
            updated_at=now or utc_now(),
        )
        with self._engine.begin() as conn:
            updated = conn.execute(update(tasks).where(tasks.c.idempotency_key == idempotency_key).values(**values))
            if updated.rowcount == 0:
                raise LookupError(f"no ledger row for idempotency key {idempotency_key!r}: begin_submit comes first")

    def release(self, idempotency_key: str) -> None:
        """Forget a create that Rivya definitively refused, so nothing stays reserved for it.

        Only a row without a task id can be released: a task Rivya accepted may cost money and must stay
        tracked.
        """
        with self._engine.begin() as conn:
            task_id = conn.execute(select(tasks.c.task_id).where(tasks.c.idempotency_key == idempotency_key)).scalar()
            if task_id is not None:
                raise ValueError(f"idempotency key {idempotency_key!r} has task {task_id}: an accepted task is kept")
            conn.execute(delete(tasks).where(tasks.c.idempotency_key == idempotency_key))

    # -- lookups ------------------------------------------------------------------------------------

    def _one(self, *conditions: Any, newest_first: bool = False) -> TaskRecord | None:
        query = select(tasks).where(*conditions)
        if newest_first:
            query = query.order_by(tasks.c.submitted_at.desc(), tasks.c.idempotency_key.desc()).limit(1)
        with self._reader.begin() as conn:
            row = conn.execute(query).first()
        return None if row is None else _record(row)

    def _many(self, query: Any) -> list[TaskRecord]:
        with self._reader.begin() as conn:
            return [_record(row) for row in conn.execute(query)]

    def get(self, idempotency_key: str) -> TaskRecord | None:
        return self._one(tasks.c.idempotency_key == idempotency_key)

    def find_by_task(self, task_id: str) -> TaskRecord | None:
        return self._one(tasks.c.task_id == task_id)

    def latest_for_brief(self, brief_id: str) -> TaskRecord | None:
        return self._one(tasks.c.brief_id == brief_id, newest_first=True)

    # -- polling support for the sensor -------------------------------------------------------------

    def due_for_poll(self, now: datetime, limit: int) -> list[TaskRecord]:
        """Tasks waiting on Rivya whose next poll is due, most overdue first (served by the status index)."""
        return self._many(
            select(tasks)
            .where(
                tasks.c.status.in_(POLLABLE_STATUSES),
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
            updated_at=bindparam("polled_at"),
        )
        by_task = tasks.c.task_id == bindparam("polled_task_id")
        pending = [asdict(u) for u in updates if u.status in POLLABLE_STATUSES]
        final = [asdict(u) for u in updates if u.status not in POLLABLE_STATUSES]
        for rows in (pending, final):
            for row in rows:
                row["polled_task_id"], row["new_status"] = row.pop("task_id"), row.pop("status")
        with self._engine.begin() as conn:
            if pending:
                not_terminal = and_(*(tasks.c.status != status for status in TERMINAL_STATUSES))  # executemany: no IN
                conn.execute(statement.where(by_task, not_terminal), pending)
            if final:
                conn.execute(statement.where(by_task), final)
            ids = {u.task_id for u in updates}
            known = set(conn.execute(select(tasks.c.task_id).where(tasks.c.task_id.in_(ids))).scalars())
            if ids - known:
                raise LookupError(f"no ledger row for task(s) {', '.join(sorted(ids - known))}")

    def mark_timed_out(self, task_id: str, now: datetime) -> None:
        """Stop polling a task that passed its deadline: it is reported, not polled forever.

        A task that reached a terminal status in the meantime keeps it.
        """
        with self._engine.begin() as conn:
            updated = conn.execute(
                update(tasks)
                .where(tasks.c.task_id == task_id, tasks.c.status.in_(POLLABLE_STATUSES))
                .values(
                    status="timed_out",
                    error_code="timed_out",
                    error_message="no terminal status from Rivya before the task's deadline",
                    next_poll_at=None,
                    updated_at=now,
                )
            )
            if updated.rowcount == 0:
                self._require_task(conn, task_id)

    @staticmethod
    def _require_task(conn: Connection, task_id: str) -> None:
        if conn.execute(select(tasks.c.task_id).where(tasks.c.task_id == task_id)).first() is None:
            raise LookupError(f"no ledger row for task {task_id}")

    def unanswered_submits(self, *, sent_after: datetime, sent_before: datetime, limit: int) -> list[TaskRecord]:
        """Creates sent but never answered (still "submitting": the run crashed or gave up), oldest first."""
        return self._many(
            select(tasks)
            .where(
                tasks.c.status == "submitting",
                tasks.c.submitted_at > sent_after,
                tasks.c.submitted_at <= sent_before,
            )
            .order_by(tasks.c.submitted_at, tasks.c.idempotency_key)
            .limit(limit)
        )

    def succeeded_unstored(self, limit: int) -> list[TaskRecord]:
        """Succeeded tasks whose video is not in the store yet, oldest first (their URLs expire)."""
        return self._many(
            select(tasks)
            .where(tasks.c.status == "succeeded", tasks.c.stored_at.is_(None))
            .order_by(tasks.c.updated_at, tasks.c.idempotency_key)
            .limit(limit)
        )

    def mark_stored(self, task_id: str, *, uri: str, sha256: str, now: datetime | None = None) -> None:
        now = now or utc_now()
        with self._engine.begin() as conn:
            updated = conn.execute(
                update(tasks)
                .where(tasks.c.task_id == task_id)
                .values(stored_uri=uri, stored_sha256=sha256, stored_at=now, updated_at=now)
            )
            if updated.rowcount == 0:
                raise LookupError(f"no ledger row for task {task_id}")

    def count_by_status(self) -> dict[str, int]:
        with self._reader.begin() as conn:
            rows = conn.execute(select(tasks.c.status, func.count()).group_by(tasks.c.status))
            return {status: count for status, count in rows}

    # -- reports ------------------------------------------------------------------------------------

    def spend_report(self) -> list[dict[str, Any]]:
        """Credits per UTC day (of submit) and brief; `day` is an ISO date string, so the rows are JSON-ready."""
        day = func.date(tasks.c.submitted_at, type_=Date)  # times are stored as naive UTC: date() is the UTC day
        query = (
            select(
                day.label("day"),
                tasks.c.brief_id,
                func.count().label("tasks"),
                func.sum(tasks.c.reserved_credits).label("reserved"),
                func.sum(tasks.c.final_credits).label("final"),
                func.sum(tasks.c.refunded_credits).label("refunded"),
            )
            .group_by(day, tasks.c.brief_id)
            .order_by(day, tasks.c.brief_id)
        )
        with self._reader.begin() as conn:
            rows = conn.execute(query).all()
        return [
            {
                "day": row.day.isoformat(),
                "brief_id": row.brief_id,
                "tasks": int(row.tasks),
                "reserved": int(row.reserved),
                "final": int(row.final),
                "refunded": int(row.refunded),
            }
            for row in rows
        ]

    # -- brief registry (change detection by the discovery schedule) --------------------------------

    def brief_versions(self) -> dict[str, str]:
        """brief_id -> the content hash registered last."""
        with self._reader.begin() as conn:
            rows = conn.execute(select(brief_versions.c.brief_id, brief_versions.c.content_hash))
            return {brief_id: content_hash for brief_id, content_hash in rows}

    def record_brief_versions(self, versions: dict[str, str], now: datetime | None = None) -> None:
        """Upsert brief_id -> content hash in one transaction, in batches.

        One INSERT carrying tens of thousands of rows fails on SQLite with "too many SQL variables". The
        RETURNING clause makes SQLAlchemy run this executemany as "insertmanyvalues": multi-row INSERTs of
        at most 1000 rows, kept under the backend's parameter limit (999 on old SQLite builds). Without
        RETURNING, SQLAlchemy sends an upsert row by row, one round trip each on PostgreSQL.
        """
        if not versions:
            return
        now = now or utc_now()
        stmt = (sqlite.insert if self._is_sqlite else postgresql.insert)(brief_versions)
        upsert = stmt.on_conflict_do_update(
            index_elements=[brief_versions.c.brief_id],
            set_={"content_hash": stmt.excluded.content_hash, "registered_at": stmt.excluded.registered_at},
        ).returning(brief_versions.c.brief_id)
        rows = [{"brief_id": b, "content_hash": h, "registered_at": now} for b, h in versions.items()]
        with self._engine.begin() as conn:
            conn.execute(upsert, rows).close()
