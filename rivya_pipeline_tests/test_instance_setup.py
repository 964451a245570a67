"""A Dagster instance or a ledger whose first set-up was killed half way is completed by the next open.

The kills are real SIGKILLs of real processes, each just before a chosen SQL write (`kill_points.py`).
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance
from dagster._core.errors import DagsterInvalidInvocationError
from dagster._core.storage.event_log.schema import SqlEventLogStorageMetadata
from dagster._core.storage.runs.migration import REQUIRED_DATA_MIGRATIONS
from dagster._core.storage.runs.schema import RunStorageSqlMetadata
from dagster._core.storage.schedules.migration import REQUIRED_SCHEDULE_DATA_MIGRATIONS
from dagster._core.storage.schedules.schema import ScheduleStorageSqlMetadata
from sqlalchemy import MetaData, create_engine, inspect, select

from rivya_pipeline.defs.assets import BRIEF_PARTITIONS
from rivya_pipeline.instance_setup import (
    DEFAULT_CONFIG,
    EARLIER_DEFAULT_CONFIGS,
    SET_UP_KEY,
    is_set_up,
    open_instance,
    write_atomically,
    write_default_config,
)
from rivya_pipeline.ledger import Ledger
from rivya_pipeline.ledger.schema import SCHEMA_VERSION, ledger_meta
from rivya_pipeline.ledger.schema import metadata as ledger_tables
from rivya_pipeline.run_launchers import MonitoredRunLauncher
from rivya_pipeline_tests.fixtures_emulator import TEST_API_KEY
from rivya_pipeline_tests.fixtures_pipeline import FAST_LIFECYCLE
from rivya_pipeline_tests.fixtures_postgres import PG_ADMIN_URL, PG_SERVER, admin_connection
from rivya_pipeline_tests.helpers import s3_keys
from rivya_pipeline_tests.kill_points import (
    KillPoint,
    kill_during_open,
    open_together,
    recording_writes,
    writes_of_open,
)
from rivya_pipeline_tests.test_cli import EXIT_OK, cli_env, run_cli, write_folder

# Each SQLite database of a default instance, under DAGSTER_HOME, with the tables Dagster defines for it.
DAGSTER_DATABASES: dict[str, MetaData] = {
    "history/runs.db": RunStorageSqlMetadata,
    "history/runs/index.db": SqlEventLogStorageMetadata,
    "schedules/schedules.db": ScheduleStorageSqlMetadata,
}
OPENERS = 4


# The kill that left the reported home behind: the event log's index has some tables, not dynamic_partitions.
BEFORE_DYNAMIC_PARTITIONS = KillPoint("index.db", "CREATE TABLE dynamic_partitions")


# What plain Dagster leaves after a kill in its first set-up, and keeps when it opens the home again.
INDEX_DB_INCOMPLETE = "the event log's index lacks tables or indexes"
RUNS_DB_INCOMPLETE = "runs.db lacks tables or indexes"
RUNS_STAMPED_OLD = "runs.db is stamped at an old schema version"
RUNS_DATA_UNRECORDED = "the run storage's data migrations are unrecorded"
SCHEDULES_STAMPED_OLD = "schedules.db is stamped at an old schema version"


# -- the Dagster instance -----------------------------------------------------------------------------------------


def fresh_home(parent: Path) -> Path:
    home = parent / f"home-{uuid.uuid4().hex[:8]}"
    home.mkdir()
    (home / "dagster.yaml").write_text(DEFAULT_CONFIG)
    return home


def schema_names(database: Path) -> set[str]:
    """The names of the tables and indexes in a SQLite file, read from the file itself (none if there is no file)."""
    if not database.exists():
        return set()
    db = sqlite3.connect(database)
    try:
        return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
    finally:
        db.close()


def missing_dagster_schema(home: Path) -> dict[str, list[str]]:
    """The tables and unique indexes each SQLite database of the instance lacks.

    Other indexes only speed up reads, and Dagster's own migrations replace some it defines (`idx_run_tags`).
    """
    missing = {}
    for path, tables in DAGSTER_DATABASES.items():
        unique_indexes = {index.name for table in tables.tables.values() for index in table.indexes if index.unique}
        if lacking := sorted({*tables.tables, *unique_indexes} - schema_names(home / path)):
            missing[path] = lacking
    return missing


def assert_complete(instance: DagsterInstance, home: Path) -> None:
    """Every table, unique index, schema version and required data migration in place, recorded, and usable."""
    assert missing_dagster_schema(home) == {}
    assert not any(
        _behind_head(s) for s in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
    )
    assert all(instance.run_storage.has_built_index(name) for name in REQUIRED_DATA_MIGRATIONS)
    assert all(instance.schedule_storage.has_built_index(name) for name in REQUIRED_SCHEDULE_DATA_MIGRATIONS)
    assert is_set_up(instance)
    instance.add_dynamic_partitions(BRIEF_PARTITIONS, ["kite"])
    assert instance.get_dynamic_partitions(BRIEF_PARTITIONS) == ["kite"]


@pytest.fixture
def open_instances() -> Iterator[Callable[[Path], DagsterInstance]]:
    """`open_instances(home)`: open_instance, with every instance it opened disposed of after the test."""
    opened: list[DagsterInstance] = []

    def open_and_keep(home: Path) -> DagsterInstance:
        opened.append(open_instance(home))
        return opened[-1]

    yield open_and_keep
    for instance in opened:
        instance.dispose()


def test_a_run_on_a_home_killed_before_its_dynamic_partitions_table_stores_the_brief(
    tmp_path, configure_emulator, s3_bucket, s3_endpoint_url
):
    home = fresh_home(tmp_path)
    kill_during_open(BEFORE_DYNAMIC_PARTITIONS, partial(DagsterInstance.from_config, str(home)))
    # What every later run met: Dagster does not repair it on open.
    with (
        DagsterInstance.from_config(str(home)) as plain,
        pytest.raises(DagsterInvalidInvocationError, match="dynamic partitions table"),
    ):
        plain.get_dynamic_partitions(BRIEF_PARTITIONS)
    folder = tmp_path / "requests"
    write_folder(folder, {"kite.yaml": "id: kite\nprompt: A kite over a beach.\n"})
    emulator = configure_emulator(**FAST_LIFECYCLE)
    env = cli_env(
        api_key=TEST_API_KEY,
        base_url=emulator.base_url,
        bucket=s3_bucket[1],
        s3_endpoint_url=s3_endpoint_url,
        dagster_home=home,
    )

    done = run_cli(["run", "--json", "--requests", str(folder)], env, tmp_path)

    assert done.returncode == EXIT_OK, done.stderr
    outcome = json.loads(done.stdout)["kite"]
    assert outcome["status"] == "stored"
    assert f"videos/kite/{outcome['task_id']}.mp4" in s3_keys(s3_bucket)
    with DagsterInstance.from_config(str(home)) as instance:
        assert_complete(instance, home)


@pytest.mark.slow
def test_every_kill_point_of_a_first_set_up_is_completed_by_the_next_open(tmp_path, open_instances):
    """A sweep over every write of a first `open_instance` (Dagster's own set-up and the repair after it)."""
    writes = writes_of_open(partial(open_instance, fresh_home(tmp_path)), tmp_path)
    # A kill before a plain (not unique) CREATE INDEX differs from its neighbours only by an index that speeds reads
    # up. The repair of those is shown on a home that lost one; skipping them halves the sweep.
    points = [p for p in writes if not p.statement.startswith("CREATE INDEX")]
    assert {p.database for p in points} >= {"runs.db", "index.db", "schedules.db"}
    assert any(p.database == "runs.db" and p.statement.startswith("INSERT INTO kvs") for p in points)  # the record

    incomplete = {}
    for point in points:
        home = fresh_home(tmp_path)
        kill_during_open(point, partial(open_instance, home))
        try:
            assert_complete(open_instances(home), home)
        except Exception as exc:  # every point is tried, and each that failed is named with its reason
            incomplete[str(point)] = repr(exc)

    assert incomplete == {}


@pytest.mark.parametrize(
    ("point", "left_by_dagster"),
    [
        (BEFORE_DYNAMIC_PARTITIONS, [INDEX_DB_INCOMPLETE]),
        (KillPoint("runs.db", "CREATE UNIQUE INDEX idx_kvs_keys_unique"), [RUNS_DB_INCOMPLETE]),
        (KillPoint("runs.db", "INSERT INTO alembic_version"), [RUNS_STAMPED_OLD, RUNS_DATA_UNRECORDED]),
        (KillPoint("runs.db", "INSERT INTO secondary_indexes"), [RUNS_DATA_UNRECORDED]),
        (KillPoint("schedules.db", "INSERT INTO alembic_version"), [SCHEDULES_STAMPED_OLD]),
    ],
    ids=["index-tables", "runs-unique-index", "runs-stamp", "runs-data-migrations", "schedules-stamp"],
)
def test_what_a_kill_leaves_in_plain_dagster_is_repaired(tmp_path, open_instances, point, left_by_dagster):
    home = fresh_home(tmp_path)
    kill_during_open(point, partial(DagsterInstance.from_config, str(home)))
    with DagsterInstance.from_config(str(home)) as plain:
        states = {
            INDEX_DB_INCOMPLETE: "history/runs/index.db" in missing_dagster_schema(home),
            RUNS_DB_INCOMPLETE: "history/runs.db" in missing_dagster_schema(home),
            RUNS_STAMPED_OLD: _behind_head(plain.run_storage),
            RUNS_DATA_UNRECORDED: not all(plain.run_storage.has_built_index(n) for n in REQUIRED_DATA_MIGRATIONS),
            SCHEDULES_STAMPED_OLD: _behind_head(plain.schedule_storage),
        }
    assert [state for state, holds in states.items() if holds] == left_by_dagster

    assert_complete(open_instances(home), home)


def _behind_head(storage: Any) -> bool:
    current, head = storage.alembic_version()
    return current != head


def test_tables_and_indexes_missing_under_a_current_stamp_are_created_where_dagsters_migration_skips_them(
    tmp_path, open_instances
):
    """A home set up by plain Dagster (as before this repair existed), then a table and indexes gone."""
    home = fresh_home(tmp_path)
    DagsterInstance.from_config(str(home)).dispose()
    dropped = {
        "history/runs/index.db": ["DROP TABLE dynamic_partitions", "DROP INDEX idx_step_key"],
        "history/runs.db": ["DROP INDEX idx_kvs_keys_unique"],
    }
    for path, statements in dropped.items():
        db = sqlite3.connect(home / path)
        for statement in statements:
            db.execute(statement)
        db.close()
    gone = {"dynamic_partitions", "idx_dynamic_partitions", "idx_step_key", "idx_kvs_keys_unique"}
    with DagsterInstance.from_config(str(home)) as plain:
        plain.upgrade()  # what `dagster instance migrate` does: nothing here
    assert gone.isdisjoint(_names_in(home, dropped))

    assert_complete(open_instances(home), home)
    assert gone <= _names_in(home, dropped)


def _names_in(home: Path, databases: Iterable[str]) -> set[str]:
    return set().union(*(schema_names(home / path) for path in databases))


def test_a_set_up_home_opens_without_a_write(tmp_path, open_instances):
    home = fresh_home(tmp_path)
    open_instances(home)

    with recording_writes() as writes:
        instance = open_instances(home)

    assert writes == []
    assert is_set_up(instance)


def test_a_new_dagster_version_completes_the_set_up_again(tmp_path, open_instances):
    """The record names the Dagster version: a home last set up by another version is migrated by this one."""
    home = fresh_home(tmp_path)
    instance = open_instances(home)
    instance.run_storage.set_cursor_values({SET_UP_KEY: "0.0.1"})
    assert not is_set_up(instance)

    assert_complete(open_instances(home), home)


def test_processes_opening_a_fresh_home_together_all_get_a_complete_instance(tmp_path, open_instances):
    home = fresh_home(tmp_path)

    assert open_together(partial(_open_and_use, home), OPENERS) == [0] * OPENERS
    assert_complete(open_instances(home), home)


def _open_and_use(home: Path) -> None:
    with open_instance(home) as instance:
        instance.get_dynamic_partitions(BRIEF_PARTITIONS)


@pytest.mark.postgres
def test_the_production_profile_on_postgresql_is_set_up_once(postgres_home, open_instances):
    instance = open_instances(postgres_home)
    assert is_set_up(instance)
    instance.add_dynamic_partitions(BRIEF_PARTITIONS, ["kite"])

    with recording_writes() as writes:
        again = open_instances(postgres_home)

    assert writes == []
    assert again.get_dynamic_partitions(BRIEF_PARTITIONS) == ["kite"]


def test_a_config_write_that_fails_half_way_leaves_the_old_file_and_no_litter(tmp_path):
    config = tmp_path / "dagster.yaml"
    config.write_text(DEFAULT_CONFIG)

    with pytest.raises(TypeError):
        write_atomically(config, None)  # type: ignore[arg-type]  # fails inside the write

    assert config.read_text() == DEFAULT_CONFIG
    assert [p.name for p in tmp_path.iterdir()] == ["dagster.yaml"]
    write_atomically(config, "telemetry:\n  enabled: true\n")
    assert config.read_text() == "telemetry:\n  enabled: true\n"
    assert [p.name for p in tmp_path.iterdir()] == ["dagster.yaml"]


# -- the ledger -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerLocation:
    url: str  # what Ledger() gets
    driver_url: str  # the same database with an explicit driver, for the test's own look
    database: str  # the name a KillPoint gives it


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_ledger_location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], LedgerLocation]]:
    """`new_ledger_location()`: a place no ledger was opened yet, a new SQLite file or a new PostgreSQL schema."""
    if request.param == "sqlite":

        def new_sqlite_file() -> LedgerLocation:
            url = Ledger.default_url(tmp_path / f"home-{uuid.uuid4().hex[:8]}")
            return LedgerLocation(url, url, "rivya_ledger.sqlite")

        yield new_sqlite_file
        return
    schemas: list[str] = []
    with admin_connection() as conn:

        def new_schema() -> LedgerLocation:
            schemas.append(f"ledger_{uuid.uuid4().hex[:12]}")
            conn.exec_driver_sql(f'CREATE SCHEMA "{schemas[-1]}"')
            options = f"?options=-csearch_path%3D{schemas[-1]}"
            return LedgerLocation(PG_SERVER + options, PG_ADMIN_URL + options, "test")

        try:
            yield new_schema
        finally:
            for schema in schemas:
                conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')


def ledger_state(location: LedgerLocation) -> tuple[set[str], str | None]:
    """The ledger tables present and the schema version recorded, as another client sees them."""
    engine = create_engine(location.driver_url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names()) & set(ledger_tables.tables)
            version = None
            if ledger_meta.name in tables:
                version = conn.execute(
                    select(ledger_meta.c.value).where(ledger_meta.c.key == "schema_version")
                ).scalar()
        return tables, version
    finally:
        engine.dispose()


def open_and_close_ledger(url: str) -> None:
    Ledger(url).close()


def test_every_kill_point_of_a_ledgers_creation_leaves_nothing_and_the_next_open_makes_all(
    new_ledger_location, tmp_path
):
    """The schema is created in one transaction, so a kill at any of its writes leaves not one table behind."""
    points = writes_of_open(partial(open_and_close_ledger, new_ledger_location().url), tmp_path)
    assert {p.statement.split(" (")[0] for p in points} >= {
        *(f"CREATE TABLE {name}" for name in ledger_tables.tables),
        f"INSERT INTO {ledger_meta.name}",
    }
    location = new_ledger_location()

    for point in points:
        kill_during_open(point, partial(open_and_close_ledger, location.url))
        assert ledger_state(location) == (set(), None), f"a kill before {point} left a half-made ledger"

    Ledger(location.url).close()
    assert ledger_state(location) == (set(ledger_tables.tables), SCHEMA_VERSION)


@pytest.mark.parametrize("dropped", sorted(ledger_tables.tables))
def test_a_ledger_that_lost_a_table_gets_it_back_on_open(new_ledger_location, dropped):
    ledger_location = new_ledger_location()
    Ledger(ledger_location.url).close()
    engine = create_engine(ledger_location.driver_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {dropped}")
    engine.dispose()

    ledger = Ledger(ledger_location.url)
    ledger.close()

    assert ledger_state(ledger_location) == (set(ledger_tables.tables), SCHEMA_VERSION)


def test_processes_opening_a_fresh_ledger_together_all_succeed(new_ledger_location):
    ledger_location = new_ledger_location()

    assert open_together(partial(open_and_close_ledger, ledger_location.url), OPENERS) == [0] * OPENERS
    assert ledger_state(ledger_location) == (set(ledger_tables.tables), SCHEMA_VERSION)


def test_a_home_with_an_earlier_default_config_gets_todays_and_a_persons_own_config_is_kept(tmp_path):
    """Failure mode: a home made by an earlier release keeping a profile whose dead runs stay STARTED for good."""
    earlier, own = tmp_path / "earlier", tmp_path / "own"
    for home, text in ((earlier, EARLIER_DEFAULT_CONFIGS[0]), (own, EARLIER_DEFAULT_CONFIGS[0] + "# mine\n")):
        home.mkdir()
        (home / "dagster.yaml").write_text(text)
    fresh = tmp_path / "fresh"
    fresh.mkdir()

    for home in (earlier, own, fresh):
        write_default_config(home)

    assert (earlier / "dagster.yaml").read_text() == DEFAULT_CONFIG == (fresh / "dagster.yaml").read_text()
    assert (own / "dagster.yaml").read_text() == EARLIER_DEFAULT_CONFIGS[0] + "# mine\n"
    with DagsterInstance.from_config(str(earlier)) as instance:
        assert isinstance(instance.run_launcher, MonitoredRunLauncher)
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
