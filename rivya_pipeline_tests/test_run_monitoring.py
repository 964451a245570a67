"""The default profile's launcher under run monitoring (rivya_pipeline/run_launchers.py), over real boundaries: a
store run launched as the UI launches it (GraphQL, against a code server process of workspace.yaml, on the instance
`rivya-pipeline dev` creates), its code server and run process killed with SIGKILL, then Dagster's own monitoring
pass. Failure mode: a run that died with its code server stayed STARTED for good, and its video was never stored.
The warm-worker profile's launcher (rivya_pipeline/celery_launcher.py) against Celery's own result backend."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import psutil
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.launcher import WorkerStatus
from dagster._core.test_utils import create_run_for_test
from dagster._daemon.monitoring.run_monitoring import monitor_started_run
from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG as CELERY_TASK_TAG
from dagster_graphql.client.query import LAUNCH_PIPELINE_EXECUTION_MUTATION
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql, infer_job_selector

from rivya_pipeline.celery_launcher import MonitoredCeleryRunLauncher
from rivya_pipeline.defs.store_batch import STORE_VIDEOS_JOB
from rivya_pipeline.emulator import FaultRule, RivyaEmulator
from rivya_pipeline.instance_setup import write_default_config
from rivya_pipeline.run_launchers import MonitoredRunLauncher
from rivya_pipeline.settings import REPO_ROOT, Settings
from rivya_pipeline_tests.fixtures_pipeline import Pipeline
from rivya_pipeline_tests.pipeline_process import settings_env

BRIEF = "sunrise-timelapse"
HANG_SECONDS = 60.0  # the media host holds the download: the store run is executing when it is killed


@pytest.fixture
def default_instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    """The instance of a home `rivya-pipeline dev` creates."""
    home = tmp_path / "default_home"
    home.mkdir()
    write_default_config(home)
    with DagsterInstance.from_config(str(home)) as instance:
        yield instance


def code_server_processes() -> list[psutil.Process]:
    """The code servers this test process started (`dagster api grpc`), each with its run processes."""
    servers = []
    for process in psutil.Process().children(recursive=True):
        with suppress(psutil.Error):  # a process of an earlier test that ended (a zombie) has no command line
            if "grpc" in " ".join(process.cmdline()):
                servers.append(process)
    found = []
    for server in servers:
        with suppress(psutil.Error):
            found += [server, *server.children(recursive=True)]
    return found


def test_a_run_whose_code_server_died_is_failed_by_monitoring_and_its_video_stored_after(
    pipeline_settings: Settings,
    default_instance: DagsterInstance,
    emulator: RivyaEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = Pipeline(pipeline_settings, default_instance, emulator)
    pipeline.submit(BRIEF)
    store_request = pipeline.store_requests(pipeline.tick_until(lambda t: BRIEF in pipeline.store_requests(t)))[BRIEF]
    assert store_request.job_name == STORE_VIDEOS_JOB
    emulator.set_faults([FaultRule(endpoint="media", kind="slow", delay=HANG_SECONDS)])
    for name, value in settings_env(pipeline_settings).items():
        monkeypatch.setenv(name, value)
    launcher = default_instance.run_launcher
    assert isinstance(launcher, MonitoredRunLauncher)

    with define_out_of_process_context(str(REPO_ROOT / "workspace.yaml"), None, default_instance) as context:
        launched = execute_dagster_graphql(
            context,
            LAUNCH_PIPELINE_EXECUTION_MUTATION,
            variables={
                "executionParams": {
                    "selector": infer_job_selector(context, STORE_VIDEOS_JOB),
                    "runConfigData": dict(store_request.run_config),
                    "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in store_request.tags.items()]},
                }
            },
        ).data["launchPipelineExecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        # What the daemon's run queue does with a queued run: launch it (through the profile's launcher).
        default_instance.launch_run(run_id, context)

        give_up = time.monotonic() + 60
        while not emulator.stats()["faults_injected"].get("media:slow"):  # the run is downloading the video
            assert time.monotonic() < give_up, default_instance.get_run_by_id(run_id)
            time.sleep(0.1)
        alive = launcher.check_run_worker_health(default_instance.get_run_by_id(run_id))
        killed = code_server_processes()
        for process in killed:
            os.kill(process.pid, signal.SIGKILL)
        psutil.wait_procs(killed, timeout=10)
        dead = launcher.check_run_worker_health(default_instance.get_run_by_id(run_id))
        (record,) = default_instance.get_run_records(RunsFilter(run_ids=[run_id]))
        monitor_started_run(default_instance, context, record, logging.getLogger("test"))

    emulator.set_faults([])
    failed = default_instance.get_run_by_id(run_id)
    ticks = pipeline.tick_until(lambda ticks: BRIEF in pipeline.store_requests(ticks))
    stored = pipeline.launch(pipeline.store_requests(ticks)[BRIEF])

    assert alive.status == WorkerStatus.RUNNING
    assert len(killed) >= 2  # the code server and the run's process
    assert dead.status == WorkerStatus.FAILED and "gone" in str(dead.msg)
    assert failed is not None and failed.status == DagsterRunStatus.FAILURE
    assert stored.success
    record_after = pipeline.ledger.latest_for_brief(BRIEF)
    assert record_after is not None and record_after.stored_uri


def test_a_run_executing_in_its_own_process_is_never_failed_by_monitoring(default_instance: DagsterInstance) -> None:
    """Failure mode: the daemon's monitoring failing a healthy `rivya-pipeline run` (an in-process run on the same
    instance, started by no launcher, so no code server knows it)."""
    run = create_run_for_test(default_instance, job_name="store_videos", status=DagsterRunStatus.STARTED)
    (record,) = default_instance.get_run_records(RunsFilter(run_ids=[run.run_id]))

    health = default_instance.run_launcher.check_run_worker_health(run)
    with define_out_of_process_context(str(REPO_ROOT / "workspace.yaml"), None, default_instance) as context:
        monitor_started_run(default_instance, context, record, logging.getLogger("test"))

    assert health.status == WorkerStatus.RUNNING
    after = default_instance.get_run_by_id(run.run_id)
    assert after is not None and after.status == DagsterRunStatus.STARTED


@pytest.mark.parametrize(
    ("task_state", "worker"),
    [("STARTED", WorkerStatus.RUNNING), ("SUCCESS", WorkerStatus.FAILED), ("FAILURE", WorkerStatus.FAILED)],
)
def test_the_warm_worker_launcher_fails_a_run_whose_task_ended_without_its_end_event(
    task_state: str, worker: WorkerStatus, dagster_instance: DagsterInstance, tmp_path: Path
) -> None:
    """Failure mode: a run executing during a PostgreSQL cut lost its end event while its worker stored the task's
    end later; the task read SUCCESS, monitoring left the run STARTED for an hour. Celery's own database result
    backend (SQLite here) holds the task's state as a worker writes it."""
    results = f"db+sqlite:///{tmp_path / 'results.sqlite'}"
    launcher = MonitoredCeleryRunLauncher(default_queue="dagster", broker="memory://", backend=results)
    run = create_run_for_test(
        dagster_instance, job_name="store_videos", status=DagsterRunStatus.STARTED, tags={CELERY_TASK_TAG: "task-1"}
    )
    launcher.celery.backend.store_result("task-1", None, task_state)

    health = launcher.check_run_worker_health(run)

    assert health.status == worker
    if task_state == "SUCCESS":
        assert "end was never recorded" in str(health.msg)
