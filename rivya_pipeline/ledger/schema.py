"""Tables of the spend ledger, written once for SQLite and PostgreSQL alike.

Times are stored as naive UTC on both backends: SQLite has no time zone type, and a naive UTC column lets
`date(submitted_at)` give the UTC day on both without depending on a session's TimeZone setting.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, Index, Integer, MetaData, String, Table, Text, TypeDecorator

SCHEMA_VERSION = "2"

metadata = MetaData()


class UtcDateTime(TypeDecorator[datetime]):
    """Accepts only aware datetimes, stores them as naive UTC, gives them back aware in UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: the ledger takes timezone-aware UTC times only")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


ledger_meta = Table(
    "rivya_ledger_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

tasks = Table(
    "rivya_tasks",
    metadata,
    Column("idempotency_key", String(200), primary_key=True),
    Column("brief_id", String(500), nullable=False),
    Column("run_id", String(200), nullable=False),
    Column("model", String(200), nullable=False),
    Column("price_credits", Integer, nullable=False),
    # The exact JSON text of the first create attempt, replayed unchanged when its answer was lost.
    Column("body", Text, nullable=False),
    Column("task_id", String(200), nullable=True, unique=True),
    Column("status", String(32), nullable=False),
    Column("reserved_credits", Integer, nullable=False, default=0),
    Column("final_credits", Integer, nullable=False, default=0),
    Column("refunded_credits", Integer, nullable=False, default=0),
    Column("error_code", String(200)),
    Column("error_message", Text),
    Column("submitted_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("deadline_at", UtcDateTime),
    Column("next_poll_at", UtcDateTime),
    Column("last_polled_at", UtcDateTime),
    Column("poll_count", Integer, nullable=False, default=0),
    # Transient poll failures in a row: the next poll of a task waits longer after each (0 after an answer).
    Column("poll_failures", Integer, nullable=False, default=0, server_default="0"),
    Column("stored_uri", Text),
    Column("stored_sha256", String(64)),
    Column("stored_at", UtcDateTime),
    # The store queue: a succeeded task's video is due at store_due_at; NULL once it is stored or given up, so the
    # queue's index holds only what still waits, however long the history grows.
    Column("store_queued_at", UtcDateTime),  # when the task's success was first recorded: its store window opens
    Column("store_due_at", UtcDateTime),
    Column("store_attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("store_error", Text),  # the last failed attempt's reason
    Column("store_gave_up_at", UtcDateTime),  # the store window ran out (or the result URL was refused)
    Index("ix_rivya_tasks_store_due", "store_due_at"),
    Index("ix_rivya_tasks_store_gave_up", "store_gave_up_at"),
    Index("ix_rivya_tasks_status_next_poll", "status", "next_poll_at"),
    Index("ix_rivya_tasks_run", "run_id"),
    Index("ix_rivya_tasks_submitted", "submitted_at"),
    Index("ix_rivya_tasks_brief_submitted", "brief_id", "submitted_at"),
)

# Where discovery last saw each brief: a run reads its own brief's file instead of the whole folder. A hint, checked
# on every read (the file must still hold a valid brief with that id); a row that no longer holds is simply not used.
brief_files = Table(
    "rivya_brief_files",
    metadata,
    Column("folder", String(1000), primary_key=True),  # the briefs folder, resolved
    Column("brief_id", String(200), primary_key=True),
    Column("path", Text, nullable=False),  # the brief's file, relative to the folder
)
