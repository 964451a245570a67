"""Money safety, proved by the emulator's wallet (its own record of creates and charges), not by the pipeline's
opinion of itself: a budget shared by parallel run processes, kill -9 at the worst moments, Dagster's own retries
and re-executions, refusals that must not be repeated, and failed generations that must not be bought again.

Run processes are real OS processes (rivya_pipeline_tests/pipeline_process.py) sharing one Dagster instance (SQLite,
or PostgreSQL with the production profile) and its ledger; they reach the emulator, which runs in this test process,
over HTTP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetKey,
    AssetsDefinition,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    ReexecutionOptions,
    RetryPolicy,
    RunsFilter,
    define_asset_job,
    execute_job,
)

from rivya_pipeline.briefs import load_brief_by_id
from rivya_pipeline.definitions import ASSETS, build_resources
from rivya_pipeline.defs import sensors
from rivya_pipeline.defs.assets import (
    RESEND_TAG,
    briefs_partitions,
    generation_task,
    reference_uploads,
    stored_video,
    video_brief,
)
from rivya_pipeline.defs.inputs import TASK_TAG
from rivya_pipeline.defs.resources import default_ledger_url
from rivya_pipeline.defs.sensors import PARTITION_TAG, RESEND_AFTER
from rivya_pipeline.emulator import FAIL_MARKER, FaultRule, RivyaEmulator
from rivya_pipeline.headless import QUIET_LOGS, HeadlessRun, failure_text
from rivya_pipeline.ledger import RESEND_WINDOW
from rivya_pipeline.rivya import RetryPolicy as ClientRetryPolicy
from rivya_pipeline.settings import Settings
from rivya_pipeline.storage import VideoStore, make_s3_client
from rivya_pipeline_tests.fixtures_emulator import TEST_ACCOUNT, TEST_CREDITS
from rivya_pipeline_tests.fixtures_pipeline import FAST_LIFECYCLE, SUBMIT_SELECTION, Pipeline, stored_videos
from rivya_pipeline_tests.helpers import (
    KLING_PRICE,
    latest_stored_video,
    materialization,
    metadata_values,
    s3_bytes,
    s3_keys,
)
from rivya_pipeline_tests.kill_points import KillPoint, kill_during_open
from rivya_pipeline_tests.pipeline_process import (
    RunProcess,
    implicit_asset_job,
    launch_here,
    materialize_here,
    new_barrier,
    settings_env,
    start_materialize,
)

SUBMIT_NAMES = [asset.key.to_user_string() for asset in SUBMIT_SELECTION]
UNPAID_STEPS = [video_brief, reference_uploads]  # everything before the paid create
CLIENT_ATTEMPTS = ClientRetryPolicy().max_attempts  # what the Rivya resource's client tries per call
RACERS = 8
AFFORDABLE_TASKS = 3
PROCESS_TIMEOUT_SECONDS = 120
WAIT_POLL_SECONDS = 0.01
STALL_SECONDS = 30  # longer than the kill takes to arrive; the client would time out and replay otherwise
RESULT_BYTES = 16_000_000  # three 5 MiB parts and a tail
TRICKLE_BYTES_PER_SECOND = 2_000_000  # the first part (5 MiB) is read after ~2.6 s: a wide window to kill in
SMALLEST_PART_MB = 5
TEXT_BRIEF = "sunrise-timelapse"
REFERENCE_BRIEF = "product-spin"


def race_brief(index: int) -> str:
    return f"""id: race-{index}
prompt: Paper boat number {index} drifting down a rain-filled gutter, seen from street level.
params:
  duration: 3
"""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_instance(request: pytest.FixtureRequest, dagster_instance: DagsterInstance) -> DagsterInstance:
    """The Dagster instance every run process opens, and with it the default ledger (no RIVYA_LEDGER_URL): a SQLite
    file in its home, or the tables beside Dagster's own in its PostgreSQL database."""
    return dagster_instance if request.param == "sqlite" else request.getfixturevalue("postgres_instance")


@pytest.fixture
def start_run() -> Iterator[Callable[..., RunProcess]]:
    """`start_materialize`, with every process it started and that still runs when the test ends killed."""
    started: list[RunProcess] = []

    def start(*args: Any, **kwargs: Any) -> RunProcess:
        started.append(start_materialize(*args, **kwargs))
        return started[-1]

    yield start
    for run in started:
        run.process.kill()  # a no-op for one that has ended
        run.process.join(PROCESS_TIMEOUT_SECONDS)


def wait_until(condition: Callable[[], bool], process: RunProcess, what: str) -> None:
    """Poll until `condition()`; fails at once if the process it waits on has ended instead."""
    give_up = time.monotonic() + PROCESS_TIMEOUT_SECONDS
    while not condition():
        if process.exited():
            raise AssertionError(f"the run process ended before {what}: {process.outcome(0)}")
        if time.monotonic() > give_up:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(WAIT_POLL_SECONDS)


def run_env(settings: Settings, instance: DagsterInstance) -> dict[str, str]:
    """The environment of a run process (the API key and any DAGSTER_PG_* are already in os.environ)."""
    return {**os.environ, **settings_env(settings), "DAGSTER_HOME": instance.root_directory}


def idempotency_key(pipeline: Pipeline, brief_id: str) -> str:
    return load_brief_by_id(pipeline.requests_path, brief_id).request.idempotency_key()


def charges(emulator: RivyaEmulator) -> list[tuple[str, int]]:
    return [(charge["task_id"], charge["credits"]) for charge in emulator.stats()["charges"]]


def ambiguous_create_faults() -> list[FaultRule]:
    """Every attempt of the client's retry loop fails, and one of them was performed (charged) with its answer lost.

    The 429s carry Retry-After: 0, so the loop runs out in no time; its last attempt creates the task and the
    connection drops before the answer: the run cannot know whether it paid.
    """
    return [
        FaultRule(endpoint="create_generation", kind="rate_limited", retry_after=0, times=CLIENT_ATTEMPTS - 1),
        FaultRule(endpoint="create_generation", kind="lost_response", lost_as="drop_connection", times=1),
    ]


# -- budget across run processes -----------------------------------------------------------------------------


def test_eight_run_processes_with_a_budget_for_three_tasks_create_exactly_three(
    pipeline_settings: Settings,
    shared_instance: DagsterInstance,
    emulator: RivyaEmulator,
    start_run,
    tmp_path: Path,
) -> None:
    settings = dataclasses.replace(
        pipeline_settings, ledger_url=None, max_credits_per_day=AFFORDABLE_TASKS * KLING_PRICE
    )
    # This process reads the ledger where the default put it; the run processes are given no ledger URL at all.
    pipeline = Pipeline(
        dataclasses.replace(settings, ledger_url=default_ledger_url(shared_instance)), shared_instance, emulator
    )
    brief_ids = [f"race-{i}" for i in range(RACERS)]
    for index, brief_id in enumerate(brief_ids):
        pipeline.write_brief(f"{brief_id}.yaml", race_brief(index))
    pipeline.add_partitions(brief_ids)
    env = run_env(settings, shared_instance)
    together = new_barrier(RACERS)  # each process opens its instance, then all 8 start their runs at once

    processes = {
        brief_id: start_run(env, SUBMIT_NAMES, brief_id, tmp_path / f"{brief_id}.json", barrier=together)
        for brief_id in brief_ids
    }
    outcomes = {brief_id: process.outcome(PROCESS_TIMEOUT_SECONDS) for brief_id, process in processes.items()}

    submitted = sorted(b for b, o in outcomes.items() if o["success"])
    refused = {b: o["failure"] for b, o in outcomes.items() if not o["success"]}
    assert len(submitted) == AFFORDABLE_TASKS and len(refused) == RACERS - AFFORDABLE_TASKS
    for failure in refused.values():
        assert failure.startswith("Not submitted: per-day credit limit: 270 of 270 credits reserved"), failure
        assert "this task costs 90" in failure
    stats = emulator.stats()
    assert stats["creates_performed"] == AFFORDABLE_TASKS
    assert [credits for _, credits in charges(emulator)] == [KLING_PRICE] * AFFORDABLE_TASKS
    assert stats["wallets"][TEST_ACCOUNT] == TEST_CREDITS - AFFORDABLE_TASKS * KLING_PRICE
    assert sorted(pipeline.ledger.latest_for_brief(b).task_id for b in submitted) == sorted(
        task_id for task_id, _ in charges(emulator)
    )
    assert [pipeline.ledger.latest_for_brief(b) for b in refused] == [None] * len(refused)  # still pending
    pipeline.ledger.close()


# -- kill -9 -------------------------------------------------------------------------------------------------


def test_kill_after_the_create_was_charged_then_the_rerun_reattaches_and_pays_once(
    pipeline: Pipeline, emulator: RivyaEmulator, start_run, tmp_path: Path
) -> None:
    pipeline.add_partitions([TEXT_BRIEF])
    emulator.set_faults(
        [FaultRule(endpoint="create_generation", kind="lost_response", lost_as="stall", delay=STALL_SECONDS, times=1)]
    )
    env = run_env(pipeline.settings, pipeline.instance)
    process = start_run(env, SUBMIT_NAMES, TEXT_BRIEF, tmp_path / "outcome.json")
    wait_until(lambda: emulator.stats()["creates_performed"] == 1, process, "the create")
    process.kill_9(PROCESS_TIMEOUT_SECONDS)  # Rivya has created and charged the task; the run never heard the answer

    key = idempotency_key(pipeline, TEXT_BRIEF)
    crashed = pipeline.ledger.get(key)
    assert (crashed.status, crashed.task_id) == ("submitting", None)

    rerun = materialization(pipeline.materialize([generation_task], TEXT_BRIEF), "generation_task")

    assert (rerun["action"], rerun["idempotency_key"]) == ("resend", key)
    assert charges(emulator) == [(rerun["task_id"], KLING_PRICE)]
    stats = emulator.stats()
    assert (stats["creates_performed"], stats["idempotent_replays"]) == (1, 1)
    assert stats["wallets"][TEST_ACCOUNT] == TEST_CREDITS - KLING_PRICE
    assert pipeline.ledger.get(key).task_id == rerun["task_id"]


@pytest.mark.parametrize("phase", ["downloading", "uploading"])
def test_kill_during_the_transfer_leaves_no_object_and_the_next_run_stores_it(
    make_pipeline, configure_emulator, s3_bucket, start_run, tmp_path: Path, phase: str
) -> None:
    emulator = configure_emulator(**FAST_LIFECYCLE, result_min_bytes=RESULT_BYTES)
    pipeline = make_pipeline(s3_chunk_mb=SMALLEST_PART_MB)
    pipeline.submit(TEXT_BRIEF)
    (request,) = pipeline.store_requests(pipeline.tick_until(pipeline.store_requests)).values()
    task_id = pipeline.ledger.latest_for_brief(TEXT_BRIEF).task_id
    client, bucket = s3_bucket
    store = VideoStore(make_s3_client(pipeline.settings.s3_endpoint_url), bucket, pipeline.settings.s3_prefix)
    video_key = store.video_key(TEXT_BRIEF, task_id)
    emulator.set_faults(
        [FaultRule(endpoint="media", kind="trickle", bytes_per_second=TRICKLE_BYTES_PER_SECOND, times=1)]
    )

    env = run_env(pipeline.settings, pipeline.instance)
    process = start_run(env, ["stored_video"], TEXT_BRIEF, tmp_path / "outcome.json", tags={TASK_TAG: task_id})
    if phase == "downloading":  # bytes are flowing; the first part is still seconds away from S3
        wait_until(lambda: emulator.stats()["media_bytes_served"] > 0, process, "the download")
    else:  # a multipart upload is open and receiving parts
        wait_until(lambda: store.open_multipart_uploads(), process, "the multipart upload")
    open_at_kill = store.open_multipart_uploads()
    process.kill_9(PROCESS_TIMEOUT_SECONDS)

    assert [key for key, _ in open_at_kill] == ([] if phase == "downloading" else [video_key])
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{pipeline.settings.s3_prefix}/{TEXT_BRIEF}/")
    assert listed.get("Contents", []) == []  # no partial video, no sidecar

    stored = stored_videos(pipeline.launch(request))[TEXT_BRIEF]  # the sensor's batch, launched after the kill

    video = client.get_object(Bucket=bucket, Key=video_key)["Body"].read()
    sidecar = json.loads(client.get_object(Bucket=bucket, Key=store.sidecar_key(TEXT_BRIEF, task_id))["Body"].read())
    assert len(video) == RESULT_BYTES
    assert hashlib.sha256(video).hexdigest() == sidecar["sha256"] == stored["sha256"]
    assert store.open_multipart_uploads() == []  # the killed run's upload was aborted before storing again
    assert pipeline.ledger.find_by_task(task_id).stored_sha256 == sidecar["sha256"]
    assert emulator.stats()["media_requests"] == 2


STORE_RECORD_KILLS = {
    # The video is in S3; the run dies as it writes the partition's materialization, before the ledger's mark.
    "before-the-materialization": KillPoint("", "INSERT INTO event_logs", parameter="ASSET_MATERIALIZATION"),
    # The materialization is written; the run dies as the ledger marks the video stored.
    "before-the-ledgers-mark": KillPoint("", "UPDATE rivya_tasks SET", mentions="stored_uri"),
}


@pytest.mark.parametrize("point", STORE_RECORD_KILLS.values(), ids=STORE_RECORD_KILLS.keys())
@pytest.mark.parametrize("store_run", ["store_videos", "stored_video"])
def test_a_store_killed_between_its_upload_and_its_records_is_stored_and_recorded_by_a_later_run(
    pipeline: Pipeline, emulator: RivyaEmulator, s3_bucket, tmp_path: Path, point: KillPoint, store_run: str
) -> None:
    """Failure mode: the video is uploaded but its run (the sensor's batch, or a run of its partition) dies before
    the partition and the ledger both say so. The ledger's mark comes last, so the video stays in the store queue
    and the sensor has it stored and recorded again."""
    pipeline.submit(TEXT_BRIEF)
    (batch,) = pipeline.store_requests(pipeline.tick_until(pipeline.store_requests)).values()
    task_id = pipeline.ledger.latest_for_brief(TEXT_BRIEF).task_id
    env, outcome = run_env(pipeline.settings, pipeline.instance), tmp_path / "outcome.json"
    if store_run == "store_videos":
        run = partial(launch_here, env, str(batch.job_name), batch.run_config, dict(batch.tags), outcome)
    else:
        run = partial(materialize_here, env, ["stored_video"], TEXT_BRIEF, outcome, {TASK_TAG: task_id}, None)
    kill_during_open(point, run)

    store = VideoStore(make_s3_client(pipeline.settings.s3_endpoint_url), s3_bucket[1], pipeline.settings.s3_prefix)
    video_key = store.video_key(TEXT_BRIEF, task_id)
    assert s3_keys(s3_bucket, video_key) == [video_key]
    assert pipeline.ledger.find_by_task(task_id).stored_at is None
    (killed,) = pipeline.instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    pipeline.instance.report_run_failed(killed)  # what run monitoring does once the run's process is gone
    (retry,) = pipeline.store_requests(pipeline.tick_until(pipeline.store_requests)).values()
    stored = stored_videos(pipeline.launch(retry))[TEXT_BRIEF]

    record = pipeline.ledger.find_by_task(task_id)
    latest = metadata_values(latest_stored_video(pipeline.instance, TEXT_BRIEF).asset_materialization)
    assert (latest["task_id"], latest["sha256"]) == (task_id, stored["sha256"])
    assert (record.stored_uri, record.stored_sha256) == (stored["s3_uri"], stored["sha256"])
    assert hashlib.sha256(s3_bytes(s3_bucket, video_key)).hexdigest() == stored["sha256"]
    assert charges(emulator) == [(task_id, KLING_PRICE)]
    assert pipeline.tick().run_requests == []  # stored and recorded: nothing is asked for again


# -- Dagster retries and re-executions -----------------------------------------------------------------------


def test_dagster_reexecution_of_a_run_whose_create_outcome_is_unknown_resends_and_pays_once(
    pipeline: Pipeline, emulator: RivyaEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real re-execution path (what run retries and "re-execute from failure" in the UI do): a new run of the
    same job, from the failed step, loading the upstream outputs the failed run stored."""
    for name, value in settings_env(pipeline.settings).items():
        monkeypatch.setenv(name, value)  # the reconstructable job builds its definitions from the environment
    pipeline.add_partitions([REFERENCE_BRIEF])
    emulator.set_faults(ambiguous_create_faults())
    job = implicit_asset_job()

    failed = execute_job(
        job,
        pipeline.instance,
        run_config=QUIET_LOGS,
        tags={"dagster/partition": REFERENCE_BRIEF},
        asset_selection=[AssetKey(name) for name in SUBMIT_NAMES],
    )

    assert not failed.success
    assert failure_text(failed).startswith("Outcome of the create is unknown (transport_error")
    assert emulator.stats()["requests"]["create_generation"] == CLIENT_ATTEMPTS  # the client's whole retry loop
    assert len(charges(emulator)) == 1
    key = idempotency_key(pipeline, REFERENCE_BRIEF)
    assert pipeline.ledger.get(key).status == "submitting"
    uploads = emulator.stats()["uploads_performed"]

    options = ReexecutionOptions.from_failure(failed.run_id, pipeline.instance)
    # The parent's tags (its partition among them) go along, as the daemon's run retries copy them.
    with execute_job(job, pipeline.instance, tags=failed.dagster_run.tags, reexecution_options=options) as retried:
        assert retried.success
        assert retried.dagster_run.parent_run_id == failed.run_id
        steps = {e.step_key for e in retried.all_events if e.event_type == DagsterEventType.STEP_START}
        resent = materialization(retried, "generation_task")

    assert steps == {"generation_task"}  # the brief and its upload were not redone
    assert (resent["action"], resent["idempotency_key"]) == ("resend", key)
    assert charges(emulator) == [(resent["task_id"], KLING_PRICE)]
    stats = emulator.stats()
    assert (stats["creates_performed"], stats["idempotent_replays"], stats["uploads_performed"]) == (1, 1, uploads)


def set_sensor_clock(monkeypatch: pytest.MonkeyPatch, instant: datetime) -> None:
    """From now on the sensor sees the time as `instant`."""
    monkeypatch.setattr(sensors, "utc_now", lambda: instant)


def unanswered_create(pipeline: Pipeline, emulator: RivyaEmulator, brief_id: str):
    """A submit run that gave up on its create (charged, answer lost) and left the ledger row "submitting"."""
    pipeline.add_partitions([brief_id])
    emulator.set_faults(ambiguous_create_faults())
    failed = pipeline.submit(brief_id, raise_on_error=False)
    assert failure_text(failed).startswith("Outcome of the create is unknown")
    record = pipeline.ledger.get(idempotency_key(pipeline, brief_id))
    assert record.status == "submitting"
    return record


def test_sensor_resends_a_create_left_unanswered_as_soon_as_its_run_has_ended_and_it_is_paid_once(
    pipeline, emulator
) -> None:
    """No wait: the run that sent the create has ended, so nothing can still be in flight (an outage that failed the
    run is often over by the next tick)."""
    record = unanswered_create(pipeline, emulator, REFERENCE_BRIEF)

    (request,) = pipeline.tick().run_requests
    assert (request.run_key, request.partition_key) == (f"{record.idempotency_key}:resend:0", REFERENCE_BRIEF)
    assert request.job_name == "resend_generation_task"

    shutil.rmtree(pipeline.instance.storage_directory())  # the re-send runs elsewhere: no step output of the first
    resent = materialization(pipeline.launch(request), "generation_task")

    assert (resent["action"], resent["idempotency_key"]) == ("resend", record.idempotency_key)
    assert charges(emulator) == [(resent["task_id"], KLING_PRICE)]
    assert emulator.stats()["creates_performed"] == 1
    assert pipeline.ledger.get(record.idempotency_key).task_id == resent["task_id"]
    assert [r.run_key for r in pipeline.tick().run_requests if ":resend:" in r.run_key] == []


def test_a_create_whose_sender_may_still_be_going_is_not_resent(pipeline, emulator, monkeypatch) -> None:
    """A run of the partition that runs generation_task is unfinished (here: canceling), or no run is known to have
    sent the create (its runs deleted): then nothing is re-sent until RESEND_AFTER from sending."""
    record = unanswered_create(pipeline, emulator, REFERENCE_BRIEF)
    (sender,) = pipeline.instance.get_runs(RunsFilter(tags={PARTITION_TAG: REFERENCE_BRIEF}))

    def canceling_run(job_name: str, asset: AssetsDefinition) -> DagsterRun:
        run = pipeline.instance.create_run_for_job(
            pipeline.definitions.resolve_job_def(job_name),
            tags={PARTITION_TAG: REFERENCE_BRIEF},
            asset_selection={asset.key},
        )
        pipeline.instance.report_run_canceling(run)
        assert pipeline.instance.get_run_by_id(run.run_id).status == DagsterRunStatus.CANCELING
        return run

    canceling_run("store_video", stored_video)
    assert [r.job_name for r in pipeline.tick().run_requests] == ["resend_generation_task"]  # not its asset

    going = canceling_run("resend_generation_task", generation_task)
    set_sensor_clock(monkeypatch, record.submitted_at + RESEND_AFTER + timedelta(seconds=1))
    assert pipeline.tick().run_requests == []
    pipeline.instance.delete_run(going.run_id)

    pipeline.instance.delete_run(sender.run_id)
    set_sensor_clock(monkeypatch, record.submitted_at + RESEND_AFTER - timedelta(seconds=1))
    assert pipeline.tick().run_requests == []
    set_sensor_clock(monkeypatch, record.submitted_at + RESEND_AFTER + timedelta(seconds=1))
    assert [r.job_name for r in pipeline.tick().run_requests] == ["resend_generation_task"]
    assert emulator.stats()["creates_performed"] == 1


def test_resends_are_spaced_after_a_failed_one_and_bounded(pipeline, emulator, monkeypatch) -> None:
    record = unanswered_create(pipeline, emulator, REFERENCE_BRIEF)
    (first,) = pipeline.tick().run_requests
    emulator.set_faults([FaultRule(endpoint="create_generation", kind="rate_limited", retry_after=0)])  # Rivya down
    assert not pipeline.launch(first, raise_on_error=False).success
    (failed_run,) = pipeline.instance.get_run_records(RunsFilter(tags={RESEND_TAG: record.idempotency_key}))
    ended = datetime.fromtimestamp(failed_run.end_time, UTC)

    set_sensor_clock(monkeypatch, ended + RESEND_AFTER - timedelta(seconds=1))
    assert pipeline.tick().run_requests == []
    set_sensor_clock(monkeypatch, ended + RESEND_AFTER + timedelta(seconds=1))
    (second,) = pipeline.tick().run_requests
    assert second.run_key == f"{record.idempotency_key}:resend:1"

    monkeypatch.setattr(sensors, "MAX_RESEND_ATTEMPTS", 1)
    set_sensor_clock(monkeypatch, ended + RESEND_WINDOW - RESEND_AFTER)
    assert pipeline.tick().run_requests == []  # a person looks now; the failed runs say why
    assert emulator.stats()["creates_performed"] == 1


def test_a_resend_run_sends_nothing_once_the_brief_asks_for_something_else(pipeline, emulator, monkeypatch) -> None:
    record = unanswered_create(pipeline, emulator, TEXT_BRIEF)
    source = load_brief_by_id(pipeline.requests_path, TEXT_BRIEF).source
    source.write_text(source.read_text().replace("prompt: ", "prompt: Edited. ", 1))
    set_sensor_clock(monkeypatch, record.submitted_at + RESEND_AFTER + timedelta(seconds=1))
    (request,) = pipeline.tick().run_requests

    refused = pipeline.launch(request, raise_on_error=False)

    assert failure_text(refused).startswith(f"This run was to re-send the unanswered create {record.idempotency_key}")
    assert emulator.stats()["requests"]["create_generation"] == CLIENT_ATTEMPTS  # only the first run's loop
    assert pipeline.ledger.get(record.idempotency_key).status == "submitting"


def run_with_step_retries(pipeline: Pipeline, brief_id: str):
    """generation_task in a job whose op retry policy retries every retryable failure (Dagster's step retries)."""
    job = define_asset_job(
        "generation_task_with_step_retries",
        selection=[generation_task],
        partitions_def=briefs_partitions,
        op_retry_policy=RetryPolicy(max_retries=2),
    )
    definitions = Definitions(assets=ASSETS, jobs=[job], resources=build_resources(pipeline.settings))
    return definitions.resolve_job_def(job.name).execute_in_process(
        partition_key=brief_id, instance=pipeline.instance, run_config=QUIET_LOGS, raise_on_error=False
    )


def step_retries(result) -> int:
    return sum(1 for event in result.all_events if event.event_type == DagsterEventType.STEP_UP_FOR_RETRY)


def test_step_retry_after_an_unknown_create_outcome_resends_and_pays_once(
    pipeline: Pipeline, emulator: RivyaEmulator
) -> None:
    pipeline.add_partitions([TEXT_BRIEF])
    pipeline.materialize(UNPAID_STEPS, TEXT_BRIEF)
    emulator.set_faults(ambiguous_create_faults())

    result = run_with_step_retries(pipeline, TEXT_BRIEF)

    assert result.success and step_retries(result) == 1
    resent = materialization(result, "generation_task")
    assert resent["action"] == "resend"
    assert charges(emulator) == [(resent["task_id"], KLING_PRICE)]
    assert emulator.stats()["creates_performed"] == 1


def wallet_too_small(pipeline: Pipeline, emulator: RivyaEmulator) -> Callable[[], None]:
    emulator.set_credits(TEST_ACCOUNT, KLING_PRICE - 1)
    return lambda: emulator.set_credits(TEST_ACCOUNT, TEST_CREDITS)


def uploads_forgotten(pipeline: Pipeline, emulator: RivyaEmulator) -> Callable[[], None]:
    """Rivya no longer knows the uploaded references (an expired file): its validation refuses the create."""
    emulator.reset()
    return lambda: pipeline.materialize(UNPAID_STEPS, REFERENCE_BRIEF)


@pytest.mark.parametrize(
    ("break_it", "code"),
    [(wallet_too_small, "insufficient_credits"), (uploads_forgotten, "validation_failed")],
    ids=["insufficient_credits", "validation_failed"],
)
def test_a_refused_create_is_not_retried_and_releases_its_reservation(
    make_pipeline, emulator: RivyaEmulator, break_it, code: str
) -> None:
    pipeline = make_pipeline(max_credits_per_day=KLING_PRICE)  # room for exactly the one task
    pipeline.add_partitions([REFERENCE_BRIEF])
    pipeline.materialize(UNPAID_STEPS, REFERENCE_BRIEF)
    repair = break_it(pipeline, emulator)

    refused = run_with_step_retries(pipeline, REFERENCE_BRIEF)

    assert not refused.success and step_retries(refused) == 0  # Failure(allow_retries=False) beats the policy
    assert failure_text(refused).startswith(f"Rivya refused the task: {code}:")
    assert emulator.stats()["requests"]["create_generation"] == 1
    assert charges(emulator) == []
    assert pipeline.ledger.latest_for_brief(REFERENCE_BRIEF) is None  # the reservation is released

    repair()
    fixed = run_with_step_retries(pipeline, REFERENCE_BRIEF)

    assert fixed.success  # the per-day cap has room again, and a fresh body is sent, not the refused one
    created = materialization(fixed, "generation_task")
    assert created["action"] == "new"
    assert charges(emulator) == [(created["task_id"], KLING_PRICE)]


# -- failed generations ----------------------------------------------------------------------------------------


def test_a_failed_generation_is_bought_again_only_after_regenerate_is_bumped(
    pipeline: Pipeline, emulator: RivyaEmulator
) -> None:
    brief = f"""id: doomed-lantern
prompt: "A paper lantern rising over a dark lake {FAIL_MARKER}"
params:
  duration: 3
"""
    path = pipeline.write_brief("doomed.yaml", brief)
    first = materialization(pipeline.submit("doomed-lantern"), "generation_task")
    pipeline.tick_until(lambda ticks: pipeline.ledger.find_by_task(first["task_id"]).status == "failed")

    again = pipeline.materialize([generation_task], "doomed-lantern", raise_on_error=False)
    whole = pipeline.submit("doomed-lantern", raise_on_error=False)
    headless = HeadlessRun(settings=pipeline.settings, instance=pipeline.instance)  # `rivya-pipeline run`
    (reported,) = headless.run([load_brief_by_id(pipeline.requests_path, "doomed-lantern")], timeout_seconds=5)

    for result in (again, whole):
        assert not result.success
        text = failure_text(result)
        assert f"Task {first['task_id']} for brief 'doomed-lantern' failed (generation_failed; 90 credits" in text
        assert "bump `regenerate`" in text
    assert (reported.status, reported.task_id, reported.refunded_credits) == ("failed", first["task_id"], KLING_PRICE)
    assert emulator.stats()["creates_performed"] == 1

    path.write_text(brief + "regenerate: 1\n", encoding="utf-8")
    regenerated = materialization(pipeline.submit("doomed-lantern"), "generation_task")

    assert regenerated["action"] == "new"
    assert regenerated["idempotency_key"] != first["idempotency_key"]
    assert [task_id for task_id, _ in charges(emulator)] == [first["task_id"], regenerated["task_id"]]
    assert emulator.stats()["creates_performed"] == 2
