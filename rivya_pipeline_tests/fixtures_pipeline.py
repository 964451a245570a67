"""The Dagster layer under test: the real definitions on a real (temporary) Dagster instance, wired to the
emulator and the moto S3 server over HTTP. `pipeline` drives assets, sensor and schedule like the daemon would."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    ExecuteInProcessResult,
    RunRequest,
    build_schedule_context,
    build_sensor_context,
)
from dagster._core.definitions.schedule_definition import ScheduleExecutionData
from dagster._core.definitions.sensor_definition import SensorExecutionData
from dagster._core.test_utils import create_run_for_test

from rivya_pipeline.definitions import build_definitions, build_resources
from rivya_pipeline.defs.assets import generation_task, reference_uploads, stored_video, video_brief
from rivya_pipeline.defs.inputs import TASK_TAG
from rivya_pipeline.defs.store_batch import STORE_VIDEOS_JOB, batched_task_ids
from rivya_pipeline.emulator import RivyaEmulator
from rivya_pipeline.headless import QUIET_LOGS, materialize_brief
from rivya_pipeline.ledger import Ledger
from rivya_pipeline.settings import REPO_ROOT, Settings
from rivya_pipeline_tests.fixtures_emulator import TEST_API_KEY
from rivya_pipeline_tests.helpers import metadata_values

SUBMIT_SELECTION = [video_brief, reference_uploads, generation_task]
SAMPLE_BRIEFS = ("city-morph", "product-spin", "sunrise-timelapse")
# A fast lifecycle: a task is terminal well before the sensor's first poll (2.5 s after submit).
FAST_LIFECYCLE = {"queued_seconds": 0.1, "processing_seconds": 0.3}
TICK_PAUSE_SECONDS = 0.5
# The store backoff on a scaled clock: 0.2 s, 0.4 s ... up to 1 s between attempts, instead of 1 min ... 30 min.
FAST_STORE_RETRY = {"store_retry_first_seconds": 0.2, "store_retry_max_seconds": 1.0}
FAST_RELAUNCH = {"relaunch_first_seconds": 0.2}  # discovery relaunches a dead version after 0.2, 0.4, 0.8 s
TICK_GIVE_UP_SECONDS = 30.0


@dataclasses.dataclass
class Pipeline:
    """One deployment of the pipeline: settings, its Dagster instance, and the emulator behind it."""

    settings: Settings
    instance: DagsterInstance
    emulator: RivyaEmulator

    def __post_init__(self) -> None:
        self.definitions = build_definitions(self.settings)
        self.repository = self.definitions.get_repository_def()
        self.ledger = Ledger(self.settings.ledger_url)

    @property
    def requests_path(self) -> Path:
        return self.settings.requests_path

    def materialize(
        self, selection: list, brief_id: str, tags: dict[str, str] | None = None, raise_on_error: bool = True
    ) -> ExecuteInProcessResult:
        return materialize_brief(
            selection,
            brief_id,
            instance=self.instance,
            resources=build_resources(self.settings),
            tags=tags,
            raise_on_error=raise_on_error,
        )

    def submit(self, brief_id: str, tags: dict[str, str] | None = None, **kwargs: Any) -> ExecuteInProcessResult:
        """brief -> uploads -> paid task, in one run, for a brief whose partition exists."""
        self.add_partitions([brief_id])
        return self.materialize(SUBMIT_SELECTION, brief_id, tags, **kwargs)

    def launch(self, request: RunRequest, raise_on_error: bool = True) -> ExecuteInProcessResult:
        """Launch what the sensor asked for, as the daemon would: its job, partition, config and tags."""
        job = self.definitions.resolve_job_def(str(request.job_name))
        return job.execute_in_process(
            run_config={**QUIET_LOGS, **request.run_config},
            instance=self.instance,
            partition_key=request.partition_key,
            tags=dict(request.tags),
            raise_on_error=raise_on_error,
        )

    def store_requests(self, ticks: list[SensorExecutionData]) -> dict[str, RunRequest]:
        """brief id -> the latest request to store its video: a store_videos batch or a store_video run of its own."""
        by_brief = {}
        for request in (r for tick in ticks for r in tick.run_requests):
            if request.job_name == STORE_VIDEOS_JOB:
                for task_id in batched_task_ids(request.run_config):
                    by_brief[self.ledger.find_by_task(task_id).brief_id] = request
            elif request.tags.get(TASK_TAG):
                by_brief[request.partition_key] = request
        return by_brief

    def record_launch(
        self,
        request: RunRequest,
        status: DagsterRunStatus = DagsterRunStatus.SUCCESS,
        extra_tags: dict[str, str] | None = None,
    ) -> None:
        """Dagster's record of a request the daemon launched, without running it: NOT_STARTED, created and then the
        daemon died; FAILURE, failed as the run queue fails a run it could not launch (the broker down). With the
        tags Dagster puts on such a run (and `extra_tags`, as a step adds them)."""
        tags = {**(extra_tags or {}), **request.tags, "dagster/run_key": str(request.run_key)}
        if request.partition_key:
            tags["dagster/partition"] = request.partition_key
        failed = status == DagsterRunStatus.FAILURE
        run = create_run_for_test(
            self.instance,
            job_name=str(request.job_name or "__ASSET_JOB"),
            run_config=dict(request.run_config),
            tags=tags,
            status=DagsterRunStatus.NOT_STARTED if failed else status,
        )
        if failed:
            self.instance.report_run_failed(run, "Caught an error dequeuing run")  # its end time, as Dagster records it

    def add_partitions(self, brief_ids: list[str]) -> None:
        known = set(self.instance.get_dynamic_partitions("briefs"))
        self.instance.add_dynamic_partitions("briefs", [b for b in brief_ids if b not in known])

    def tick(self) -> SensorExecutionData:
        """One sensor evaluation as the code server runs it (instance_ref lets it resolve dynamic partitions)."""
        with build_sensor_context(
            instance=self.instance,
            instance_ref=self.instance.get_ref(),
            resources=build_resources(self.settings),
            definitions=self.definitions,
        ) as context:
            return self.repository.get_sensor_def("pending_generation_tasks").evaluate_tick(context)

    def tick_until(self, done: Callable[[list[SensorExecutionData]], bool]) -> list[SensorExecutionData]:
        """Ticks, pausing between ticks, until `done(all ticks so far)`; every tick is returned."""
        ticks: list[SensorExecutionData] = []
        give_up = time.monotonic() + TICK_GIVE_UP_SECONDS
        while True:
            ticks.append(self.tick())
            if done(ticks):
                return ticks
            if time.monotonic() > give_up:
                raise AssertionError(f"sensor never got there in {len(ticks)} ticks: {ticks[-1]}")
            time.sleep(TICK_PAUSE_SECONDS)

    def discover(self, at: datetime) -> ScheduleExecutionData:
        """One evaluation of the `brief_discovery` schedule at `at`."""
        schedule = self.repository.get_schedule_def("brief_discovery")
        with build_schedule_context(
            instance=self.instance,
            instance_ref=self.instance.get_ref(),
            scheduled_execution_time=at,
            resources=build_resources(self.settings),
            repository_def=self.repository,
        ) as context:
            return schedule.evaluate_tick(context)

    def write_brief(self, name: str, text: str) -> Path:
        path = self.requests_path / name
        path.write_text(text, encoding="utf-8")
        return path


def stored_videos(result: ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """brief id -> the metadata of its stored_video materialization in a run (of one partition or a batch)."""
    return {
        str(event.partition): metadata_values(event.materialization)
        for event in result.get_asset_materialization_events()
        if event.asset_key == stored_video.key
    }


@pytest.fixture
def pipeline_settings(
    tmp_path: Path,
    configure_emulator: Callable[..., RivyaEmulator],
    s3_bucket: tuple[Any, str],
    s3_endpoint_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """Settings for the emulator and the S3 bucket, over a private copy of the sample briefs.

    The key is set in the environment only: RivyaResource reads it through EnvVar when a run starts.
    """
    emulator = configure_emulator(**FAST_LIFECYCLE)
    monkeypatch.setenv("RIVYA_API_KEY", TEST_API_KEY)
    requests_path = tmp_path / "requests"
    shutil.copytree(REPO_ROOT / "requests", requests_path)
    return dataclasses.replace(
        Settings.from_env({}),
        requests_path=requests_path,
        base_url=emulator.base_url,
        s3_bucket=s3_bucket[1],
        s3_endpoint_url=s3_endpoint_url,
        s3_region="us-east-1",
        allow_local_media=True,
        ledger_url=f"sqlite:///{tmp_path / 'ledger.sqlite'}",
        **FAST_STORE_RETRY,
        **FAST_RELAUNCH,
    )


@pytest.fixture
def dagster_instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DagsterInstance.local_temp(str(home)) as instance:
        yield instance


@pytest.fixture
def make_pipeline(
    pipeline_settings: Settings, dagster_instance: DagsterInstance, emulator: RivyaEmulator
) -> Iterator[Callable[..., Pipeline]]:
    """`make_pipeline(max_credits_per_run=90)`: the test pipeline with some settings replaced."""
    made: list[Pipeline] = []

    def make(**overrides: Any) -> Pipeline:
        made.append(Pipeline(dataclasses.replace(pipeline_settings, **overrides), dagster_instance, emulator))
        return made[-1]

    yield make
    for pipeline in made:
        pipeline.ledger.close()


@pytest.fixture
def pipeline(make_pipeline: Callable[..., Pipeline]) -> Pipeline:
    return make_pipeline()
