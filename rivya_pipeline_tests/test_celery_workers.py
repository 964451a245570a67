"""Warm workers (deploy/celery/dagster.yaml), executed: the Dagster daemon and two Celery workers on this machine's
RabbitMQ and PostgreSQL take a batch of briefs from the folder to S3, through a kill -9 of the pool process that
runs a paid submit and of the one that runs a store.

Nothing is driven by the test but the emulator's faults and the two kills: the discovery schedule (every minute)
launches the submit runs, the sensor the store runs, the run queue sends them to the workers, run monitoring
finds the dead pool processes, and run retries and the sensor put the work back. Only intervals are shortened,
in the instance's config. Every process the test starts is killed when it ends, whatever happened.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.storage.tags import PARENT_RUN_ID_TAG, RUN_KEY_TAG

from rivya_pipeline.cli import EXIT_INVALID, main
from rivya_pipeline.defs.inputs import TASK_TAG
from rivya_pipeline.defs.resources import PAID_CREATE_POOL, default_ledger_url
from rivya_pipeline.defs.sensors import PARTITION_TAG, UNFINISHED
from rivya_pipeline.defs.store_batch import STORE_VIDEOS_JOB, batched_task_ids
from rivya_pipeline.emulator import FaultRule, RivyaEmulator
from rivya_pipeline.ledger import Ledger
from rivya_pipeline.settings import Settings
from rivya_pipeline.workers import CeleryTarget, ServiceProcesses, delete_queue
from rivya_pipeline_tests.fixtures_emulator import TEST_ACCOUNT, TEST_API_KEY, TEST_CREDITS
from rivya_pipeline_tests.helpers import KLING_PRICE, s3_bytes
from rivya_pipeline_tests.warm_workers import (
    BROKER,
    broker_queue_name,
    deployment_variables,
    s3_videos,
    services_env,
    skip_without_broker,
    start_warm_services,
    stored_briefs,
    wait_for,
    warm_settings,
    write_celery_home,
)

BRIEFS = [f"warm-{index}" for index in range(6)]
WORKERS = 2  # one pool process each: at most two runs execute at once, which makes the moments to kill findable
# Long enough to outlast what the other pool process does meanwhile on a loaded machine; the kill ends them sooner.
STALL_SECONDS = 240.0
TRICKLE_BYTES_PER_SECOND = 4000  # a result video (about 700 kB) then takes minutes to download
INSTANCE_OVERRIDES = {
    "run_monitoring": {"poll_interval_seconds": 1, "free_slots_after_run_end_seconds": 1},
}
STARTED_PID = re.compile(r"Started process for run \(pid: (\d+)\)")


@pytest.fixture
def celery_target(pg_database: str) -> Iterator[CeleryTarget]:
    skip_without_broker(BROKER)
    backend = f"db+postgresql+psycopg2://postgres@127.0.0.1:5432/{pg_database}"
    target = CeleryTarget(broker=BROKER, backend=backend, queue=broker_queue_name())
    yield target
    delete_queue(target)


@pytest.fixture
def celery_home(tmp_path: Path, celery_target: CeleryTarget) -> Path:
    """DAGSTER_HOME with the profile; only the queue and the monitoring intervals differ."""
    return write_celery_home(tmp_path / "celery_home", celery_target.queue, INSTANCE_OVERRIDES)


@pytest.fixture
def settings(pipeline_settings: Settings, tmp_path: Path) -> Settings:
    """Six text-only briefs in a folder of their own; discovery every minute; the ledger follows the instance."""
    return warm_settings(
        pipeline_settings,
        tmp_path / "warm_briefs",
        BRIEFS,
        request_timeout_seconds=STALL_SECONDS * 2,  # the stalled create waits for its kill, not for a client timeout
    )


@pytest.fixture
def deployment_env(
    celery_home: Path, celery_target: CeleryTarget, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """What every machine of the deployment sets (this process too, which opens the same instance)."""
    env = deployment_variables(celery_home, pg_database, celery_target)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def instance(deployment_env: dict[str, str]) -> Iterator[DagsterInstance]:
    """The deployment's instance and ledger, created here before any other process opens them."""
    with DagsterInstance.from_config(deployment_env["DAGSTER_HOME"]) as instance:
        Ledger(default_ledger_url(instance)).close()
        yield instance


@pytest.fixture
def services(
    settings: Settings,
    deployment_env: dict[str, str],
    celery_target: CeleryTarget,
    instance: DagsterInstance,
    tmp_path: Path,
) -> Iterator[ServiceProcesses]:
    """The daemon and two workers, configured as a deployment is: through their environment only."""
    processes = ServiceProcesses(services_env(settings, deployment_env), log_dir=tmp_path / "logs")
    try:
        yield start_warm_services(processes, WORKERS)
    finally:
        processes.stop()


def stored_tasks_of(run: DagsterRun) -> set[str]:
    """The tasks whose videos a run stores: a store_videos batch's, or a store_video run's one."""
    if run.job_name == STORE_VIDEOS_JOB:
        return set(batched_task_ids(run.run_config))
    return {run.tags[TASK_TAG]} if TASK_TAG in run.tags else set()


def unstored_tasks(ledger: Ledger) -> set[str]:
    records = [ledger.latest_for_brief(brief_id) for brief_id in BRIEFS]
    return {record.task_id for record in records if record and record.task_id and not record.stored_uri}


def the_stalled_submit(instance: DagsterInstance, ledger: Ledger, emulator: RivyaEmulator) -> str | None:
    """The run whose create Rivya performed and charged but has not answered, once every other brief got its
    answer: then it is the only submit still in flight (the other pool process did the other five)."""
    if emulator.stats()["faults_injected"].get("create_generation:lost_response") != 1:
        return None
    records = [ledger.latest_for_brief(brief_id) for brief_id in BRIEFS]
    unanswered = [record.brief_id for record in records if record is not None and record.task_id is None]
    answered = [record for record in records if record is not None and record.task_id is not None]
    if len(unanswered) != 1 or len(answered) != len(BRIEFS) - 1:
        return None
    runs = instance.get_runs(RunsFilter(tags={PARTITION_TAG: unanswered[0]}, statuses=[DagsterRunStatus.STARTED]))
    return runs[0].run_id if len(runs) == 1 else None


def the_trickling_store(instance: DagsterInstance, ledger: Ledger, emulator: RivyaEmulator) -> str | None:
    """The store run whose download is trickling, once it is the only store run left and holds every video not
    stored yet (a batch may hold others behind the trickling one)."""
    if emulator.stats()["faults_injected"].get("media:trickle") != 1:
        return None
    started = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    runs = [run for run in started if stored_tasks_of(run)]
    unstored = unstored_tasks(ledger)
    if len(runs) == 1 and unstored and unstored <= stored_tasks_of(runs[0]):
        return runs[0].run_id
    return None


def kill_the_pool_process_of(instance: DagsterInstance, run_id: str, services: ServiceProcesses) -> int:
    """kill -9 of the process that executes the run: a pool process of this test's workers (checked)."""
    pids = [int(m.group(1)) for event in instance.all_logs(run_id) if (m := STARTED_PID.match(event.message or ""))]
    (pid,) = pids
    process = psutil.Process(pid)
    workers = services.processes["workers"].pid
    assert workers in {parent.pid for parent in process.parents()}, f"pid {pid} is not a pool process of a worker"
    process.kill()
    process.wait(timeout=30)
    return pid


def failed_by_monitoring(instance: DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    if run is None or run.status != DagsterRunStatus.FAILURE:
        return False
    return any("Detected run worker status FAILED" in (event.message or "") for event in instance.all_logs(run_id))


def generation_actions(instance: DagsterInstance, brief_id: str) -> list[str]:
    """`action` of every generation_task materialization of a brief, oldest first (submitted, resend, ...)."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("generation_task"), asset_partitions=[brief_id]), limit=10, ascending=True
    ).records
    return [str(record.asset_materialization.metadata["action"].value) for record in records]


def pool_is_free(instance: DagsterInstance) -> bool:
    info = instance.event_log_storage.get_concurrency_info(PAID_CREATE_POOL)
    return not info.claimed_slots and not info.pending_steps


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_and_the_daemon_store_every_brief_once_through_two_kills(
    settings: Settings,
    services: ServiceProcesses,
    instance: DagsterInstance,
    emulator: RivyaEmulator,
    s3_bucket: tuple[Any, str],
) -> None:
    emulator.set_faults(
        [FaultRule(endpoint="create_generation", kind="lost_response", lost_as="stall", delay=STALL_SECONDS, times=1)]
    )
    ledger = Ledger(default_ledger_url(instance))
    try:
        # A paid submit in flight: Rivya has created and charged its task; the run has not heard the answer.
        submit_run = wait_for(lambda: the_stalled_submit(instance, ledger, emulator), "the stalled create", services)
        stalled_brief = instance.get_run_by_id(submit_run).tags[PARTITION_TAG]
        kill_the_pool_process_of(instance, submit_run, services)
        emulator.set_faults(
            [FaultRule(endpoint="media", kind="trickle", bytes_per_second=TRICKLE_BYTES_PER_SECOND, times=1)]
        )
        wait_for(lambda: failed_by_monitoring(instance, submit_run), "monitoring to fail the submit", services)

        # A store in flight: its download has begun and will take minutes.
        store_run = wait_for(lambda: the_trickling_store(instance, ledger, emulator), "the trickling store", services)
        killed_store_tasks = unstored_tasks(ledger)
        kill_the_pool_process_of(instance, store_run, services)
        wait_for(lambda: failed_by_monitoring(instance, store_run), "monitoring to fail the store", services)

        wait_for(lambda: stored_briefs(instance) == set(BRIEFS), "every brief stored", services)
        wait_for(lambda: pool_is_free(instance), "the killed submit's pool slot back", services)
        wait_for(lambda: not instance.get_runs(RunsFilter(statuses=UNFINISHED)), "the run queue empty", services)
        records = {brief_id: ledger.latest_for_brief(brief_id) for brief_id in BRIEFS}
    finally:
        ledger.close()
    runs = instance.get_runs()
    healed_submit = generation_actions(instance, stalled_brief)

    # Nothing bought twice: one charge per brief, the killed create answered by replaying it under its key.
    stats = emulator.stats()
    charges = stats["charges"]
    assert sorted(charge["task_id"] for charge in charges) == sorted(record.task_id for record in records.values())
    assert [charge["credits"] for charge in charges] == [KLING_PRICE] * len(BRIEFS)
    assert stats["wallets"][TEST_ACCOUNT] == TEST_CREDITS - KLING_PRICE * len(BRIEFS)
    assert stats["creates_performed"] == len(BRIEFS) and stats["idempotent_replays"] >= 1
    assert healed_submit[-1] == "resend"  # the retried run re-sent the recorded create; Rivya replayed its task
    (submit_retry,) = [run for run in runs if run.tags.get(PARENT_RUN_ID_TAG) == submit_run]  # Dagster's run retry
    assert submit_retry.status == DagsterRunStatus.SUCCESS

    # Nothing lost: one video per brief in S3, the bytes the ledger recorded.
    videos = s3_videos(s3_bucket, settings.s3_prefix)
    assert {brief_id: len(keys) for brief_id, keys in videos.items()} == dict.fromkeys(BRIEFS, 1)
    for brief_id, (key,) in videos.items():
        record = records[brief_id]
        assert key.endswith(f"/{brief_id}/{record.task_id}.mp4")
        assert hashlib.sha256(s3_bytes(s3_bucket, key)).hexdigest() == record.stored_sha256

    # Every run but the two whose pool process was killed succeeded; those two were failed by run monitoring.
    failed = {run.run_id for run in runs if run.status != DagsterRunStatus.SUCCESS}
    assert failed == {submit_run, store_run}
    # Each video the dead store had not stored was stored once more, alone, by the sensor's store retry (Dagster
    # does not retry store runs); the other videos were stored in batches.
    assert killed_store_tasks
    retried = {run.tags[TASK_TAG]: run for run in runs if run.tags.get(TASK_TAG) in killed_store_tasks}
    assert retried.keys() == killed_store_tasks
    assert {run.tags[RUN_KEY_TAG] for run in retried.values()} == {f"{task}:store" for task in killed_store_tasks}
    assert any(run.job_name == STORE_VIDEOS_JOB for run in runs)


# -- what `rivya-pipeline workers` refuses ------------------------------------------------------------------------


def test_workers_refuse_an_instance_whose_runs_would_never_reach_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # the default instance: a new process per run, no broker
    monkeypatch.setenv("RIVYA_API_KEY", TEST_API_KEY)

    assert main(["workers"]) == EXIT_INVALID

    error = capsys.readouterr().err
    assert "No workers started" in error and "MonitoredRunLauncher" in error
    assert "deploy/celery/dagster.yaml" in error


def test_workers_refuse_a_base_url_without_a_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.delenv("RIVYA_API_KEY", raising=False)
    monkeypatch.setenv("RIVYA_BASE_URL", "https://rivya.example")

    assert main(["workers"]) == EXIT_INVALID

    assert "refusing to guess a key" in capsys.readouterr().err
