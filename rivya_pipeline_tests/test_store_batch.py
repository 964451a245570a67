"""Stores in batches (`store_videos`): fewer runs, and still everything per partition.

Each test launches the sensor's run requests the way the daemon would, on a real instance, against the emulator and
the S3 server over HTTP.
"""

from __future__ import annotations

from dagster import AssetCheckKey, DagsterRunStatus, RunsFilter
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.test_utils import create_run_for_test

from rivya_pipeline.briefs import load_briefs
from rivya_pipeline.defs import store_batch
from rivya_pipeline.defs.assets import STORED_VIDEO_CHECKS, stored_video
from rivya_pipeline.defs.inputs import TASK_TAG
from rivya_pipeline.defs.store_batch import STORE_VIDEOS_JOB, batched_task_ids
from rivya_pipeline.defs.storing import STORE_FAILED
from rivya_pipeline.emulator import FaultRule
from rivya_pipeline.headless import HeadlessRun, failure_text
from rivya_pipeline.settings import utc_now
from rivya_pipeline_tests.fixtures_pipeline import SAMPLE_BRIEFS, stored_videos
from rivya_pipeline_tests.helpers import KLING_PRICE, latest_stored_video, materialization, metadata_values, s3_keys

CHECK_KEYS = [AssetCheckKey(stored_video.key, spec.name) for spec in STORED_VIDEO_CHECKS]


def submit_all(pipeline) -> dict[str, str]:
    """brief id -> task id, for the three sample briefs."""
    return {b: materialization(pipeline.submit(b), "generation_task")["task_id"] for b in SAMPLE_BRIEFS}


def batch_for_all(pipeline):
    """The tick's one store_videos request, once every sample brief's task has succeeded."""
    ticks = pipeline.tick_until(lambda ticks: pipeline.store_requests(ticks[-1:]).keys() == set(SAMPLE_BRIEFS))
    (request,) = ticks[-1].run_requests
    return request


def test_one_run_stores_many_videos_each_with_its_own_materialization_and_checks(pipeline, s3_bucket):
    tasks = submit_all(pipeline)
    request = batch_for_all(pipeline)

    result = pipeline.launch(request)

    assert request.job_name == STORE_VIDEOS_JOB and request.partition_key is None
    assert sorted(batched_task_ids(request.run_config)) == sorted(tasks.values())
    stored = stored_videos(result)
    assert {brief: video["task_id"] for brief, video in stored.items()} == tasks
    prompts = {b.id: b.prompt for b in load_briefs(pipeline.requests_path)}
    for brief_id, video in stored.items():
        assert video["s3_uri"].endswith(f"/{brief_id}/{tasks[brief_id]}.mp4")
        assert video["prompt"] == prompts[brief_id]
        assert pipeline.ledger.find_by_task(tasks[brief_id]).stored_uri == video["s3_uri"]
        # Every check of the partition evaluated on that partition's own materialization: the UI shows them current.
        materialized = latest_stored_video(pipeline.instance, brief_id)
        assert materialized.run_id == result.run_id
        recorded = pipeline.instance.event_log_storage.get_latest_asset_check_execution_by_key(
            CHECK_KEYS, partition_filter=PartitionKeyFilter(key=brief_id)
        )
        assert {key.name: rec.status for key, rec in recorded.items()} == {
            key.name: AssetCheckExecutionRecordStatus.SUCCEEDED for key in CHECK_KEYS
        }
        targets = {rec.evaluation.target_materialization_data.storage_id for rec in recorded.values()}
        assert targets == {materialized.storage_id}
    infos = pipeline.instance.event_log_storage.get_asset_check_partition_info(CHECK_KEYS)
    assert {(info.partition_key, info.is_current) for info in infos} == {(b, True) for b in SAMPLE_BRIEFS}
    prefix = pipeline.settings.s3_prefix
    videos = {b: [k for k in s3_keys(s3_bucket, f"{prefix}/{b}/") if k.endswith(".mp4")] for b in tasks}
    assert {b: len(keys) for b, keys in videos.items()} == dict.fromkeys(tasks, 1)
    assert pipeline.store_requests([pipeline.tick()]) == {}


def test_a_video_that_fails_in_a_batch_is_reported_on_its_partition_and_retried_alone(pipeline):
    tasks = submit_all(pipeline)
    request = batch_for_all(pipeline)
    first_task = batched_task_ids(request.run_config)[0]
    (doomed,) = [brief for brief, task in tasks.items() if task == first_task]
    pipeline.emulator.set_faults([FaultRule(endpoint="media", kind="server_error", times=1)])  # its download only

    result = pipeline.launch(request, raise_on_error=False)

    assert not result.success
    assert stored_videos(result).keys() == set(SAMPLE_BRIEFS) - {doomed}  # the others did not wait for it
    assert failure_text(result).startswith(f"1 of 3 videos not stored; each is retried alone when due: {doomed}: ")
    (observation,) = [
        e.asset_observation_data.asset_observation
        for e in result.all_events
        if e.is_asset_observation and e.asset_key == stored_video.key
    ]
    assert observation.partition == doomed
    assert metadata_values(observation)[STORE_FAILED].startswith(f"Result video of task {first_task} not stored")
    assert pipeline.ledger.find_by_task(first_task).stored_uri is None

    assert pipeline.ledger.find_by_task(first_task).store_attempts == 1
    (alone,) = pipeline.tick_until(lambda ticks: ticks[-1].run_requests)[-1].run_requests  # once its backoff passed
    assert (alone.job_name, alone.partition_key, alone.tags[TASK_TAG]) == ("store_video", doomed, first_task)
    assert alone.run_key == f"{first_task}:store"
    retried = pipeline.launch(alone)
    assert stored_videos(retried).keys() == {doomed}
    assert pipeline.tick().run_requests == []
    assert [c["credits"] for c in pipeline.emulator.stats()["charges"]] == [KLING_PRICE] * 3  # storing is free


def test_a_batch_leaves_a_video_stored_meanwhile_as_it_is(pipeline, s3_bucket):
    tasks = submit_all(pipeline)
    request = batch_for_all(pipeline)
    manual = pipeline.materialize([stored_video], "city-morph")  # say, from the UI, before the batch ran
    before = latest_stored_video(pipeline.instance, "city-morph").storage_id

    result = pipeline.launch(request)

    assert stored_videos(result).keys() == set(SAMPLE_BRIEFS) - {"city-morph"}
    assert latest_stored_video(pipeline.instance, "city-morph").storage_id == before
    assert materialization(manual, "stored_video")["task_id"] == tasks["city-morph"]
    prefix = pipeline.settings.s3_prefix
    assert len([k for k in s3_keys(s3_bucket, f"{prefix}/city-morph/") if k.endswith(".mp4")]) == 1


def test_sensor_spreads_stores_over_batches_and_never_asks_twice_for_a_video_in_one(pipeline, monkeypatch):
    monkeypatch.setattr(store_batch, "STORE_BATCH_SIZE", 2)
    tasks = submit_all(pipeline)
    pipeline.tick_until(lambda ticks: len(pipeline.ledger.due_for_store(utc_now(), limit=10)) == 3)

    first = pipeline.tick().run_requests

    batches = [batched_task_ids(r.run_config) for r in first]
    assert sorted(len(batch) for batch in batches) == [1, 2]
    assert sorted(task for batch in batches for task in batch) == sorted(tasks.values())
    assert len({r.run_key for r in first}) == 2
    # The daemon has created the runs (not started yet): no video of theirs is asked for again, alone or in a batch.
    for request in first:
        create_run_for_test(
            pipeline.instance,
            job_name=STORE_VIDEOS_JOB,
            run_config=request.run_config,
            status=DagsterRunStatus.NOT_STARTED,
        )
    assert pipeline.tick().run_requests == []


def test_sensor_retries_alone_only_the_videos_a_dead_batch_did_not_store(pipeline):
    tasks = submit_all(pipeline)
    request = batch_for_all(pipeline)
    pipeline.materialize([stored_video], "product-spin")  # stored before the batch's worker died
    dead = create_run_for_test(
        pipeline.instance, job_name=STORE_VIDEOS_JOB, run_config=request.run_config, status=DagsterRunStatus.STARTED
    )
    assert pipeline.tick().run_requests == []  # its worker may still be storing

    pipeline.instance.report_run_failed(dead)  # what run monitoring does when the worker is gone
    retries = pipeline.tick().run_requests

    assert sorted((r.job_name, r.partition_key, r.tags[TASK_TAG]) for r in retries) == sorted(
        ("store_video", brief, tasks[brief]) for brief in ("city-morph", "sunrise-timelapse")
    )


def test_headless_run_stores_in_batches(pipeline):
    briefs = load_briefs(pipeline.requests_path)
    count = len(briefs)

    outcomes = HeadlessRun(settings=pipeline.settings, instance=pipeline.instance).run(briefs, timeout_seconds=60)

    assert {o.brief_id: o.status for o in outcomes} == {b.id: "stored" for b in briefs}
    runs = pipeline.instance.get_runs()
    store_runs = [run for run in runs if run.job_name == STORE_VIDEOS_JOB]
    assert len(runs) == count + len(store_runs)  # one submit run per brief; no store run of one partition
    assert 1 <= len(store_runs) <= count
    assert sorted(t for run in store_runs for t in batched_task_ids(run.run_config)) == sorted(
        o.task_id for o in outcomes
    )
    assert all(run.status == DagsterRunStatus.SUCCESS for run in runs)
    assert pipeline.instance.get_runs(RunsFilter(tags={TASK_TAG: outcomes[0].task_id})) == []
