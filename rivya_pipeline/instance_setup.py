"""The Dagster instance of a DAGSTER_HOME, opened so that a process killed during its first set-up never breaks it.

Dagster's SQLite storages create their tables one statement at a time, stamp their schema version after that,
and record their data migrations last. A `kill -9` in between leaves, for example, the event log's index without
its dynamic partitions table: Dagster never looks again, and every later run fails until someone runs
`dagster instance migrate`. So until a home is known to be complete, opening it does what that person would do,
and a little more: it creates the tables and indexes a database lacks (from Dagster's own table definitions, which
are internal to Dagster: the Dagster family is pinned, and the tests fail if they move), then runs Dagster's own
migration, `DagsterInstance.upgrade`. Then it records, in the instance's own key-value store, that this Dagster
version finished the set-up; every later open reads that one row.

The whole open happens under a file lock in the home, so processes that start together never race through
Dagster's first set-up or through the repair. The lock is the kernel's: it dies with a killed process.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

from dagster import DagsterInstance, __version__
from dagster._core.storage.event_log.schema import SqlEventLogStorageMetadata
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._core.storage.runs.schema import RunStorageSqlMetadata
from dagster._core.storage.runs.sql_run_storage import SqlRunStorage
from dagster._core.storage.schedules.schema import ScheduleStorageSqlMetadata
from dagster._core.storage.schedules.sql_schedule_storage import SqlScheduleStorage
from filelock import FileLock
from sqlalchemy import MetaData
from sqlalchemy.exc import SQLAlchemyError

# The dagster.yaml of a new home: Dagster's defaults (SQLite in the home), no telemetry banner, a limit for the
# `rivya_api` pool so that paid submits do not stampede, and runs that die with their process finished by Dagster:
# the launcher answers run monitoring's health check (run_launchers.py), monitoring fails a dead run, run retries
# start it again (paid submits re-attach through the ledger: nothing is bought twice). The numbers are the warm-worker
# profile's (deploy/celery/README.md explains each); deploy/dagster.yaml is the production profile.
DEFAULT_CONFIG = """telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 4
run_launcher:
  module: rivya_pipeline.run_launchers
  class: MonitoredRunLauncher
run_monitoring:
  enabled: true
  start_timeout_seconds: 300
  cancel_timeout_seconds: 300
  poll_interval_seconds: 30
  max_resume_run_attempts: 0
  free_slots_after_run_end_seconds: 60
run_retries:
  enabled: true
  max_retries: 2
  retry_on_asset_or_op_failure: false
"""
# Earlier projects' DEFAULT_CONFIG, word for word: a home still holding one gets today's (`write_default_config`).
EARLIER_DEFAULT_CONFIGS = ("telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 4\n",)
SET_UP_KEY = "rivya_pipeline/instance_set_up"  # its value: the Dagster version that completed the set-up
LOCK_FILE = ".rivya_instance.lock"


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: a kill mid-write leaves the old file (or none), never half."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_default_config(home: Path) -> None:
    """A home's dagster.yaml: DEFAULT_CONFIG if it has none, or still has an earlier project default untouched (a
    person's own file, edited or not ours, is never replaced)."""
    config = home / "dagster.yaml"
    if not config.exists() or config.read_text(encoding="utf-8") in EARLIER_DEFAULT_CONFIGS:
        write_atomically(config, DEFAULT_CONFIG)


def open_instance(home: Path) -> DagsterInstance:
    """The instance configured by `home`/dagster.yaml, its storage complete; the caller disposes of it."""
    with FileLock(home / LOCK_FILE):
        instance = DagsterInstance.from_config(str(home))
        try:
            if not is_set_up(instance):
                complete_set_up(instance)
        except BaseException:
            instance.dispose()
            raise
    return instance


def is_set_up(instance: DagsterInstance) -> bool:
    """Whether this Dagster version completed the set-up of the instance's storage (one key-value read)."""
    try:
        return instance.run_storage.get_cursor_values({SET_UP_KEY}).get(SET_UP_KEY) == __version__
    except SQLAlchemyError:  # a run storage whose key-value table was never created
        return False


def complete_set_up(instance: DagsterInstance) -> None:
    """Create what a killed set-up left out, migrate the storage as `dagster instance migrate` does, and record it.

    Every step is idempotent, so a set-up killed here too is completed by the next open.
    """
    _create_missing_sqlite_schema(instance)
    with redirect_stdout(sys.stderr):  # the migration prints its progress; stdout may be a `--json` answer
        instance.upgrade()
    instance.run_storage.set_cursor_values({SET_UP_KEY: __version__})


def _create_missing_sqlite_schema(instance: DagsterInstance) -> None:
    """Create the tables and indexes a SQLite database of the storage lacks, from Dagster's own table definitions.

    Dagster does not: its migration skips a database whose version is stamped, whatever it lacks, and its first
    set-up skips a table that exists, with any index a kill left out of it (unique ones included). PostgreSQL is
    left alone: Dagster creates and stamps its schema in one transaction, so it is never half made.
    """
    storages: list[tuple[object, MetaData]] = [
        (instance.run_storage, RunStorageSqlMetadata),
        (instance.event_log_storage, SqlEventLogStorageMetadata),
        (instance.schedule_storage, ScheduleStorageSqlMetadata),
    ]
    for storage, tables in storages:
        if isinstance(storage, SqlEventLogStorage):
            connection = storage.index_connection()
        elif isinstance(storage, SqlRunStorage | SqlScheduleStorage):
            connection = storage.connect()
        else:
            continue  # not a SQL storage: nothing of this kind to repair
        with connection as conn:
            if conn.dialect.name == "sqlite":
                tables.create_all(conn)  # the missing tables, each with its indexes
                for table in tables.sorted_tables:
                    for index in table.indexes:
                        index.create(conn, checkfirst=True)  # an index missing from a table that exists
