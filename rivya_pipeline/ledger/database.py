"""The one owner of the ledger's engine and of the lock that serializes budget decisions across processes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from alembic.migration import MigrationContext
from alembic.operations import Operations
from filelock import FileLock
from sqlalchemy import URL, Column, Connection, Engine, create_engine, event, func, insert, make_url, select, update

from ..rivya.models import TaskStatus
from .schema import SCHEMA_VERSION, ledger_meta, metadata, tasks

DEFAULT_LEDGER_FILE = "rivya_ledger.sqlite"
# Key of the PostgreSQL advisory lock that serializes budget decisions ("RivyaLdg" in ASCII).
SUBMIT_LOCK_ID = 0x52697679614C6467
# How long a process waits for another one's budget transaction (SQLite busy timeout, PostgreSQL
# lock_timeout) before giving up with an error rather than hanging a run.
LOCK_WAIT_SECONDS = 30


class LedgerDatabase:
    """The ledger's database at a SQLAlchemy URL; creates its tables on first use. Safe to open from many processes."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            self._engine = _sqlite_engine(parsed)
        else:
            if parsed.drivername == "postgresql":
                # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; psycopg2 is the driver that
                # dagster-postgres already brings.
                parsed = parsed.set(drivername="postgresql+psycopg2")
            self._engine = create_engine(
                parsed,
                isolation_level="READ COMMITTED",  # explicit, whatever the server's default: see serialized
                pool_pre_ping=True,
                connect_args={"connect_timeout": LOCK_WAIT_SECONDS},
            )
        # Reads need no write lock: on SQLite they start a plain deferred transaction (WAL lets them run
        # beside a writer); on PostgreSQL the option is ignored.
        self._reader = self._engine.execution_options(sqlite_begin="DEFERRED")
        self._create_schema()

    @property
    def identity(self) -> str:
        """Which database this is (its URL without a password): a key for what a process remembers of it."""
        return self._engine.url.render_as_string(hide_password=True)

    @staticmethod
    def default_url(dagster_home: str | Path) -> str:
        """A SQLite file inside DAGSTER_HOME: zero setup, and it lives as long as the Dagster instance."""
        path = Path(dagster_home).expanduser().resolve() / DEFAULT_LEDGER_FILE
        return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)

    def close(self) -> None:
        self._engine.dispose()

    def read(self) -> AbstractContextManager[Connection]:
        """A read-only transaction (a context manager giving its Connection); it takes no write lock."""
        return self._reader.begin()

    def write(self) -> AbstractContextManager[Connection]:
        """A write transaction (a context manager giving its Connection); on SQLite it holds the write lock."""
        return self._engine.begin()

    @contextmanager
    def serialized(self) -> Iterator[Connection]:
        """A write transaction that no other process's serialized transaction overlaps.

        SQLite: BEGIN IMMEDIATE already holds the database's single write lock. PostgreSQL: a
        transaction-scoped advisory lock, released by COMMIT/ROLLBACK; READ COMMITTED (set on the engine) gives
        every statement after the lock a fresh snapshot, so it sees what the previous holder committed.
        """
        with self._engine.begin() as conn:
            if not self.is_sqlite:
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_WAIT_SECONDS}s'")
                conn.execute(select(func.pg_advisory_xact_lock(SUBMIT_LOCK_ID)))
            yield conn

    def _create_schema(self) -> None:
        """Create missing tables, migrate an older ledger and check the schema version, serialized so concurrent
        first opens agree (the migration runs in the same transaction: a killed one leaves version 1 intact)."""
        with self.serialized() as conn:
            metadata.create_all(conn)
            found = conn.execute(select(ledger_meta.c.value).where(ledger_meta.c.key == "schema_version")).scalar()
            if found is None:
                conn.execute(insert(ledger_meta).values(key="schema_version", value=SCHEMA_VERSION))
            elif found == "1":
                _migrate_1_to_2(conn)
            elif found != SCHEMA_VERSION:
                raise RuntimeError(
                    f"ledger schema version {found} is not the version {SCHEMA_VERSION} this code understands"
                )


# Version 2 added these columns of rivya_tasks (schema.py has their meaning) and the store queue's index.
_ADDED_IN_2 = ("poll_failures", "store_queued_at", "store_due_at", "store_attempts", "store_error", "store_gave_up_at")


def _migrate_1_to_2(conn: Connection) -> None:
    """Add the store queue and the poll backoff's columns; every video that is paid for and not stored yet is due."""
    operations = Operations(MigrationContext.configure(conn))
    for name in _ADDED_IN_2:
        column = tasks.c[name]
        operations.add_column(
            tasks.name, Column(name, column.type, nullable=column.nullable, server_default=column.server_default)
        )
    for index in tasks.indexes:
        if index.name in ("ix_rivya_tasks_store_due", "ix_rivya_tasks_store_gave_up"):
            index.create(conn)
    conn.execute(
        update(tasks)
        .where(tasks.c.status == TaskStatus.SUCCEEDED, tasks.c.stored_at.is_(None))
        .values(store_queued_at=tasks.c.updated_at, store_due_at=tasks.c.updated_at)
    )
    conn.execute(update(ledger_meta).where(ledger_meta.c.key == "schema_version").values(value=SCHEMA_VERSION))


def _sqlite_engine(url: URL) -> Engine:
    """SQLAlchemy's documented recipe for pysqlite transaction control, with BEGIN IMMEDIATE for writes.

    pysqlite's own BEGIN handling is switched off (isolation_level None) and SQLAlchemy emits the BEGIN,
    so every write transaction takes SQLite's write lock at its start: two processes can never both
    read the same spend and then both insert. WAL lets readers (the sensor, reports) run beside it.
    """
    if url.database and url.database != ":memory:":  # an in-memory database has no WAL
        _switch_to_wal(Path(url.database))
    engine = create_engine(url, connect_args={"timeout": LOCK_WAIT_SECONDS})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        deferred = conn.get_execution_options().get("sqlite_begin") == "DEFERRED"
        conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

    return engine


def _switch_to_wal(path: Path) -> None:
    """Put the file in WAL mode once, under a file lock beside it; WAL is then a property of the file.

    Switching needs an exclusive lock that SQLite refuses at once, without waiting for its busy timeout,
    when two connections both hold a shared lock and both ask for it: processes that opened a fresh
    ledger together failed with "database is locked". The kernel's lock dies with a killed process.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=LOCK_WAIT_SECONDS):
        connection = sqlite3.connect(path, timeout=LOCK_WAIT_SECONDS)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
        finally:
            connection.close()


class LedgerPart:
    """One concern of the ledger, working on the database it shares with the others."""

    def __init__(self, database: LedgerDatabase) -> None:
        self._db = database
