"""Scale-out on Dagster's own engine: the production profile (deploy/dagster.yaml) on this machine's PostgreSQL.

Each test gets a fresh database and a DAGSTER_HOME holding the profile verbatim (its DAGSTER_PG_* variables
point at that database). Several `rivya-pipeline run` processes share the instance at once and must end exactly
where the same briefs end on SQLite; the ledger follows the instance into PostgreSQL; the profile's run retries
re-run a dead run worker but never a step that refused to spend.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg2
import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.storage.tags import RUN_FAILURE_REASON_TAG, WILL_RETRY_TAG
from dagster._core.test_utils import create_run_for_test
from sqlalchemy import Connection, create_engine, inspect, text

from rivya_pipeline.briefs import load_briefs
from rivya_pipeline.definitions import build_resources
from rivya_pipeline.defs.resources import PAID_CREATE_POOL, LedgerResource, default_ledger_url, ensure_pool_row
from rivya_pipeline.headless import HeadlessRun, failure_text, materialize_brief
from rivya_pipeline.ledger import Ledger
from rivya_pipeline.settings import REPO_ROOT, REQUESTS_PATH_ENV, Settings
from rivya_pipeline_tests.fixtures_emulator import TEST_API_KEY
from rivya_pipeline_tests.fixtures_pipeline import FAST_LIFECYCLE, SUBMIT_SELECTION
from rivya_pipeline_tests.fixtures_postgres import PG_ADMIN_URL
from rivya_pipeline_tests.helpers import track_due_task

LEDGER_TABLES = {"rivya_tasks", "rivya_ledger_meta"}
RUN_TIMEOUT_SECONDS = 60


@contextmanager
def connected(database: str) -> Iterator[Connection]:
    """A side connection to `database`, to look at it the way an operator would."""
    engine = create_engine(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}")
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def tables_in(database: str) -> set[str]:
    with connected(database) as conn:
        return set(inspect(conn).get_table_names())


@pytest.mark.postgres
def test_ledger_follows_a_postgres_instance_into_its_database(postgres_instance, postgres_home, pg_database):
    ledger = LedgerResource().for_instance(postgres_instance)
    track_due_task(ledger, "task_harbour", "key-harbour")

    assert default_ledger_url(postgres_instance) == postgres_instance.run_storage.postgres_url
    assert tables_in(pg_database) >= LEDGER_TABLES
    assert "runs" in tables_in(pg_database)  # the same database as Dagster's own tables
    with connected(pg_database) as conn:
        assert conn.execute(text("SELECT task_id FROM rivya_tasks")).scalars().all() == ["task_harbour"]
    assert not (postgres_home / "rivya_ledger.sqlite").exists()
    ledger.close()


@pytest.mark.postgres
def test_an_explicit_ledger_url_wins_over_the_instance_database(postgres_instance, pg_database, tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.sqlite'}"
    ledger = LedgerResource(ledger_url=url).for_instance(postgres_instance)
    track_due_task(ledger, "task_harbour", "key-harbour")

    assert (tmp_path / "elsewhere.sqlite").exists()
    assert not LEDGER_TABLES & tables_in(pg_database)
    ledger.close()


def test_ledger_of_a_sqlite_instance_is_still_a_file_in_its_home(dagster_instance):
    ledger = LedgerResource().for_instance(dagster_instance)
    track_due_task(ledger, "task_harbour", "key-harbour")

    assert default_ledger_url(dagster_instance) == Ledger.default_url(dagster_instance.root_directory)
    assert (Path(dagster_instance.root_directory) / "rivya_ledger.sqlite").exists()
    ledger.close()


# -- several runs at once on PostgreSQL == the same briefs on SQLite ------------------------------------------------


def brief_folders(root: Path) -> list[Path]:
    """A folder per sample file (with its images): three separate `rivya-pipeline run` invocations."""
    folders = []
    for sample in sorted((REPO_ROOT / "requests").glob("*.yaml")):
        folder = root / sample.stem
        shutil.copytree(REPO_ROOT / "requests" / "images", folder / "images")
        shutil.copy(sample, folder)
        folders.append(folder)
    return folders


def run_in_parallel(folders: list[Path], env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """`rivya-pipeline run --json` on every folder at once, each in its own process: brief id -> outcome."""
    cli = Path(sys.executable).parent / "rivya-pipeline"
    command = ["run", "--json", "--timeout", str(RUN_TIMEOUT_SECONDS), "--requests"]
    processes = [
        subprocess.Popen(
            [str(cli), *command, str(folder)],
            env=env | {REQUESTS_PATH_ENV: str(folder)},  # where the video_brief asset reads the brief again
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for folder in folders
    ]
    outcomes: dict[str, dict[str, Any]] = {}
    for process in processes:
        out, err = process.communicate(timeout=RUN_TIMEOUT_SECONDS * 2)
        assert process.returncode == 0, err.decode()
        outcomes |= json.loads(out)
    return outcomes


def backend_env(home: Path, prefix: str, emulator, s3_endpoint_url: str, bucket: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("RIVYA_", "DAGSTER_HOME"))}
    return inherited | {
        "DAGSTER_HOME": str(home),
        "RIVYA_API_KEY": TEST_API_KEY,
        "RIVYA_BASE_URL": emulator.base_url,
        "RIVYA_ALLOW_LOCAL_MEDIA": "1",
        "AWS_ENDPOINT_URL_S3": s3_endpoint_url,
        "RIVYA_S3_BUCKET": bucket,
        "RIVYA_S3_PREFIX": prefix,
    }


def what_must_not_depend_on_storage(outcomes, instance: DagsterInstance, s3_bucket, emulator) -> dict[str, Any]:
    """Per brief: status, credits and the stored video's SHA-256 (read back from S3, and as the ledger recorded
    it); and what Rivya charged. Task ids and run ids differ between deployments by nature."""
    client, bucket = s3_bucket
    ledger = Ledger(default_ledger_url(instance))
    briefs = {}
    for brief_id, outcome in outcomes.items():
        key = outcome["s3_uri"].removeprefix(f"s3://{bucket}/")
        stored = hashlib.sha256(client.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()
        briefs[brief_id] = {
            "status": outcome["status"],
            "final_credits": outcome["final_credits"],
            "refunded_credits": outcome["refunded_credits"],
            "sha256": stored,
            "ledger_sha256": ledger.find_by_task(outcome["task_id"]).stored_sha256,
        }
    ledger.close()
    stats = emulator.stats()
    charges = sorted((charge["credits"], charge["refunded"]) for charge in stats["charges"])
    return {"briefs": briefs, "creates": stats["creates_performed"], "charges": charges}


def run_in_this_process(settings: Settings, instance: DagsterInstance) -> dict[str, dict[str, Any]]:
    """The baseline: one headless run over the whole briefs folder, as `rivya-pipeline run` does it."""
    run = HeadlessRun(settings=settings, instance=instance)
    outcomes = run.run(load_briefs(settings.requests_path), RUN_TIMEOUT_SECONDS)
    return {outcome.brief_id: dataclasses.asdict(outcome) for outcome in outcomes}


def check_postgres_instance_records(instance: DagsterInstance, brief_ids: set[str]) -> None:
    """Dagster's side on PostgreSQL: a submit run and a store run per brief, all succeeded, every video
    materialized, and every pool slot given back (a leaked slot would block creates forever)."""
    runs = instance.get_runs()
    assert {run.status for run in runs} == {DagsterRunStatus.SUCCESS}
    assert len(runs) == 2 * len(brief_ids)
    stored = instance.get_materialized_partitions(AssetKey("stored_video"))
    assert stored == brief_ids
    pool = instance.event_log_storage.get_concurrency_info("rivya_api")
    assert (pool.slot_count, pool.claimed_slots, pool.pending_steps) == (4, [], [])


@pytest.mark.postgres
def test_parallel_runs_on_postgres_end_exactly_like_on_sqlite(
    tmp_path,
    postgres_home,
    pipeline_settings,
    dagster_instance,
    emulator,
    configure_emulator,
    s3_endpoint_url,
    s3_bucket,
):
    folders = brief_folders(tmp_path / "briefs")
    sqlite_settings = dataclasses.replace(pipeline_settings, ledger_url=None, s3_prefix="sqlite")
    on_sqlite = run_in_this_process(sqlite_settings, dagster_instance)
    sqlite = what_must_not_depend_on_storage(on_sqlite, dagster_instance, s3_bucket, emulator)

    configure_emulator(**FAST_LIFECYCLE)  # a fresh Rivya account for the second deployment
    with DagsterInstance.from_config(str(postgres_home)) as instance:
        # No `dagster instance concurrency set` first: every run's resources create the pool's row (#33552).
        env = backend_env(postgres_home, "postgres", emulator, s3_endpoint_url, s3_bucket[1])
        on_postgres = run_in_parallel(folders, env)
        postgres = what_must_not_depend_on_storage(on_postgres, instance, s3_bucket, emulator)
        check_postgres_instance_records(instance, set(on_postgres))

    assert postgres == sqlite
    briefs = postgres["briefs"]
    assert set(briefs) == {"product-spin", "sunrise-timelapse", "city-morph"}
    for brief in briefs.values():
        assert (brief["status"], brief["final_credits"], brief["refunded_credits"]) == ("stored", 90, 0)
        assert brief["sha256"] == brief["ledger_sha256"]
    assert postgres["creates"] == len(briefs)  # one paid task per brief
    assert postgres["charges"] == [(90, False)] * len(briefs)


# -- the paid-create pool -------------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_pool_row_is_created_at_the_profile_default_and_left_alone_once_set(postgres_instance):
    storage = postgres_instance.event_log_storage
    assert PAID_CREATE_POOL not in storage.get_concurrency_keys()  # a new database: Dagster makes it on first claim

    ensure_pool_row(postgres_instance, PAID_CREATE_POOL)
    (limit,) = storage.get_pool_limits()
    assert (limit.name, limit.limit, limit.from_default) == (PAID_CREATE_POOL, 4, True)

    storage.set_concurrency_slots(PAID_CREATE_POOL, 2)  # an operator's `dagster instance concurrency set`
    ensure_pool_row(postgres_instance, PAID_CREATE_POOL)
    assert storage.get_concurrency_info(PAID_CREATE_POOL).slot_count == 2


@pytest.mark.postgres
def test_a_run_that_loses_the_race_to_create_the_pool_row_goes_on(postgres_instance, monkeypatch):
    """dagster-io/dagster#33552: another run created the row between this run's look and its INSERT. Dagster's
    fallback UPDATE then runs in an aborted transaction; the run must not fail for it."""
    storage = postgres_instance.event_log_storage
    ensure_pool_row(postgres_instance, PAID_CREATE_POOL)  # the other run, first
    real_keys = storage.get_concurrency_keys
    looks = []

    def keys_as_seen_by_this_run() -> set[str]:
        looks.append(set() if not looks else real_keys())  # its first look predates the other run's INSERT
        return looks[-1]

    monkeypatch.setattr(storage, "get_concurrency_keys", keys_as_seen_by_this_run)

    ensure_pool_row(postgres_instance, PAID_CREATE_POOL)

    assert looks == [set(), {PAID_CREATE_POOL}]  # it tried to create the row, failed, and found it in place
    assert storage.get_concurrency_info(PAID_CREATE_POOL).slot_count == 4


def test_no_pool_row_where_the_instance_configures_no_pools(dagster_instance):
    ensure_pool_row(dagster_instance, PAID_CREATE_POOL)
    assert dagster_instance.event_log_storage.get_concurrency_keys() == set()


# -- run retries of the profile --------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_profile_re_runs_a_dead_worker_but_never_a_step_that_refused_to_spend(
    postgres_instance, pg_database, pipeline_settings, emulator
):
    settings = dataclasses.replace(pipeline_settings, ledger_url=None, max_credits_per_run=0)
    postgres_instance.add_dynamic_partitions("briefs", ["product-spin"])

    refused = materialize_brief(
        SUBMIT_SELECTION,
        "product-spin",
        instance=postgres_instance,
        resources=build_resources(settings),
        raise_on_error=False,
    )
    crashed = create_run_for_test(postgres_instance, status=DagsterRunStatus.STARTED)
    postgres_instance.report_run_failed(crashed, "Run worker pod gone")  # what run monitoring reports

    refused_run = postgres_instance.get_run_by_id(refused.run_id)
    assert refused_run.tags[RUN_FAILURE_REASON_TAG] == "STEP_FAILURE"
    assert refused_run.tags[WILL_RETRY_TAG] == "false"
    assert postgres_instance.get_run_by_id(crashed.run_id).tags[WILL_RETRY_TAG] == "true"
    assert emulator.stats()["creates_performed"] == 0
    failed = postgres_instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
    assert {run.run_id for run in failed} == {refused.run_id, crashed.run_id}
    assert failure_text(refused).startswith("Not submitted")
    with connected(pg_database) as conn:  # the ledger that refused lives in the instance's own database
        assert conn.execute(text("SELECT count(*) FROM rivya_tasks")).scalar() == 0


CALLS = 20


def connections_of_storage_calls(home: Path) -> tuple[int, int]:
    """(connections opened by CALLS run-storage and CALLS event-log calls, connections left open after dispose)."""
    opened = 0
    real_connect = psycopg2.connect

    def counting_connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal opened
        opened += 1
        return real_connect(*args, **kwargs)

    with DagsterInstance.from_config(str(home)) as instance:
        instance.get_runs_count()  # the storages exist and their tables are checked: not counted
        with mock.patch.object(psycopg2, "connect", counting_connect):
            for _ in range(CALLS):
                instance.get_runs_count()
                instance.get_materialized_partitions(AssetKey("stored_video"))
    return opened, open_connections(os.environ["DAGSTER_PG_DB"])


def open_connections(database: str) -> int:
    """Connections to `database` other than this query's own, once PostgreSQL has seen closed ones go."""
    with connected(database) as conn:
        query = text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()")
        for _ in range(50):
            count = conn.execute(query, {"db": database}).scalar_one()
            if count == 0:
                break
            time.sleep(0.1)
        return count


@pytest.mark.postgres
def test_celery_profile_keeps_its_connections_and_gives_them_back_on_dispose(postgres_home, monkeypatch):
    """Plain dagster-postgres connects once per call (a PostgreSQL process forked each time); the warm workers'
    profile reuses pooled connections, and a disposed instance (a run that ended on a worker) holds none."""
    monkeypatch.setenv("DAGSTER_CELERY_BROKER_URL", "pyamqp://guest@127.0.0.1:5672//")
    monkeypatch.setenv("DAGSTER_CELERY_BACKEND_URL", "rpc://")  # the launcher is built, never used
    plain = connections_of_storage_calls(postgres_home)
    shutil.copy(REPO_ROOT / "deploy" / "celery" / "dagster.yaml", postgres_home / "dagster.yaml")

    pooled = connections_of_storage_calls(postgres_home)

    assert plain[0] >= 2 * CALLS and plain[1] == 0  # at least one connection per call
    assert pooled[0] <= 2 and pooled[1] == 0  # one per pooled storage
