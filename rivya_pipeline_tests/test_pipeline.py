"""The Dagster layer end to end: real definitions on a real Dagster instance, the emulator and S3 over HTTP.

Runs are launched the way the daemon would launch them: the schedule's and the sensor's run requests are
materialized with their partition and tags. Only the sensor's clock is moved in the deadline test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetKey, ConfigurableResource, DagsterRunStatus, EnvVar, Shape
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.test_utils import create_run_for_test
from dagster._serdes import serialize_value
from sqlalchemy.exc import OperationalError

from rivya_pipeline import polling
from rivya_pipeline.briefs import load_briefs
from rivya_pipeline.definitions import ASSETS, build_definitions, build_resources
from rivya_pipeline.defs import resources
from rivya_pipeline.defs.assets import BATCH_TAG, STORED_VIDEO_CHECKS, generation_task, stored_video
from rivya_pipeline.defs.resources import RivyaResource
from rivya_pipeline.defs.storing import STORE_FAILED
from rivya_pipeline.emulator import FAIL_MARKER, FaultRule
from rivya_pipeline.headless import HeadlessRun, failure_text
from rivya_pipeline.settings import REPO_ROOT, UNBOUNDED_SPEND, Settings, utc_now
from rivya_pipeline_tests.fixtures_emulator import TEST_API_KEY, TEST_CREDITS
from rivya_pipeline_tests.fixtures_pipeline import SAMPLE_BRIEFS, stored_videos
from rivya_pipeline_tests.helpers import KLING_PRICE, materialization, metadata_values, s3_bytes, s3_keys

CHECK_NAMES = {spec.name for spec in STORED_VIDEO_CHECKS}
DOOMED_BRIEF = f"""id: doomed-balloon
prompt: "A red balloon drifting up past a brick wall {FAIL_MARKER}"
params:
  duration: 3
"""
NEW_BRIEF = """id: harbour-dusk
prompt: Fishing boats rocking gently in a small harbour at dusk, lanterns flickering on.
params:
  duration: 3
  aspect_ratio: "16:9"
"""
INVALID_BRIEF = """id: too-short
prompt: A clip shorter than the model allows.
params:
  duration: 2
"""


def observations(ticks, status: str) -> list[dict]:
    return [
        {"partition": event.partition, **metadata_values(event)}
        for tick in ticks
        for event in tick.asset_events
        if metadata_values(event)["status"] == status
    ]


def test_sample_briefs_end_in_s3_with_passing_checks(pipeline, emulator, s3_bucket):
    briefs = {b.id: b for b in load_briefs(pipeline.requests_path)}
    submits = {brief_id: pipeline.submit(brief_id) for brief_id in SAMPLE_BRIEFS}
    ticks = pipeline.tick_until(lambda ticks: pipeline.store_requests(ticks).keys() == set(SAMPLE_BRIEFS))
    (request,) = {r.run_key: r for r in pipeline.store_requests(ticks[-1:]).values()}.values()
    result = pipeline.launch(request)  # one store_videos run for the three videos

    prefix = pipeline.settings.s3_prefix
    assert stored_videos(result).keys() == set(SAMPLE_BRIEFS)
    for brief_id, stored in stored_videos(result).items():
        task_id = stored["task_id"]
        assert task_id == materialization(submits[brief_id], "generation_task")["task_id"]
        video_key, sidecar_key = f"{prefix}/{brief_id}/{task_id}.mp4", f"{prefix}/{brief_id}/{task_id}.json"
        picture_keys = [f"{prefix}/{brief_id}/{task_id}.{kind}.jpg" for kind in ("poster", "sheet")]
        assert sorted(s3_keys(s3_bucket, f"{prefix}/{brief_id}/")) == sorted([sidecar_key, video_key, *picture_keys])
        video_sha256 = hashlib.sha256(s3_bytes(s3_bucket, video_key)).hexdigest()
        assert stored["s3_uri"] == f"s3://{s3_bucket[1]}/{video_key}"
        assert stored["sha256"] == video_sha256
        assert stored["duration_seconds"] == float(briefs[brief_id].request.params["duration"])
        assert stored["resolution"]

        sidecar_text = s3_bytes(s3_bucket, sidecar_key).decode()
        sidecar = json.loads(sidecar_text)
        assert sidecar["brief_id"] == brief_id
        assert sidecar["prompt"] == briefs[brief_id].request.prompt
        assert sidecar["params"] == briefs[brief_id].request.params
        assert (sidecar["task_id"], sidecar["final_credits"], sidecar["sha256"]) == (task_id, KLING_PRICE, video_sha256)
        assert TEST_API_KEY not in sidecar_text

        evaluations = [c for c in result.get_asset_check_evaluations() if c.partition == brief_id]
        assert sorted((c.check_name, c.passed) for c in evaluations) == sorted((name, True) for name in CHECK_NAMES)
        recorded = pipeline.instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [AssetCheckKey(AssetKey("stored_video"), name) for name in CHECK_NAMES],
            partition_filter=PartitionKeyFilter(key=brief_id),
        )
        assert {key.name: record.status for key, record in recorded.items()} == {
            name: AssetCheckExecutionRecordStatus.SUCCEEDED for name in CHECK_NAMES
        }

    uploads = {brief_id: materialization(result, "reference_uploads")["count"] for brief_id, result in submits.items()}
    assert uploads == {"product-spin": 1, "city-morph": 2, "sunrise-timelapse": 0}
    stats = emulator.stats()
    assert stats["uploads_performed"] == 3
    assert sorted((c["credits"], c["refunded"]) for c in stats["charges"]) == [(KLING_PRICE, False)] * 3
    assert stats["wallets"]["acct_test"] == TEST_CREDITS - 3 * KLING_PRICE
    assert stats["media_authorization_headers_seen"] == 0
    for run in pipeline.instance.get_runs():
        assert TEST_API_KEY not in serialize_value(pipeline.instance.all_logs(run.run_id))


def test_failed_generation_is_reported_with_its_refund_and_never_stored(pipeline, emulator, s3_bucket):
    pipeline.write_brief("doomed.yaml", DOOMED_BRIEF)
    task_id = materialization(pipeline.submit("doomed-balloon"), "generation_task")["task_id"]

    ticks = pipeline.tick_until(lambda ticks: observations(ticks, "failed"))
    ticks.append(pipeline.tick())

    (failed,) = observations(ticks, "failed")
    assert failed["partition"] == "doomed-balloon"
    assert (failed["task_id"], failed["error_code"], failed["refunded_credits"]) == (
        task_id,
        "generation_failed",
        KLING_PRICE,
    )
    assert [r for tick in ticks for r in tick.run_requests] == []
    assert s3_keys(s3_bucket, f"{pipeline.settings.s3_prefix}/doomed-balloon/") == []
    stats = emulator.stats()
    assert [(c["task_id"], c["refunded"]) for c in stats["charges"]] == [(task_id, True)]
    assert stats["wallets"]["acct_test"] == TEST_CREDITS
    assert pipeline.ledger.find_by_task(task_id).status == "failed"


def observed(result, asset: str) -> list[dict]:
    """The AssetObservations a run recorded on `asset`."""
    events = [event.event_specific_data.asset_observation for event in result.all_events if event.is_asset_observation]
    return [
        {"partition": event.partition, **metadata_values(event)}
        for event in events
        if event.asset_key.to_user_string() == asset
    ]


def pickled_outputs(storage: Path) -> list[str]:
    """The assets whose step outputs the default IO manager wrote to this machine's disk."""
    return sorted(path.name for path in storage.glob("*") if path.name in {a.key.path[-1] for a in ASSETS})


def test_store_run_needs_nothing_from_the_machine_that_ran_the_submit(pipeline, emulator, s3_bucket):
    """Scaled out, the sensor's store run lands on another pod or worker: its input comes from the ledger."""
    task_id = materialization(pipeline.submit("product-spin"), "generation_task")["task_id"]
    storage = Path(pipeline.instance.storage_directory())
    assert pickled_outputs(storage) == []  # inputs come from the briefs folder, the event log and the ledger
    shutil.rmtree(storage, ignore_errors=True)  # the submit's machine is gone
    (request,) = pipeline.store_requests(pipeline.tick_until(pipeline.store_requests)).values()

    stored = stored_videos(pipeline.launch(request))["product-spin"]

    assert stored["task_id"] == task_id
    assert stored["s3_uri"].endswith(f"/product-spin/{task_id}.mp4")
    sidecar = json.loads(s3_bytes(s3_bucket, f"{pipeline.settings.s3_prefix}/product-spin/{task_id}.json"))
    assert sidecar["params"]["aspect_ratio"] == "1:1" and "referenceMediaItems" not in sidecar["params"]
    assert pickled_outputs(storage) == []


@pytest.mark.parametrize(
    ("asset", "missing"),
    [
        ("generation_task", "No reference uploads for brief 'sunrise-timelapse': materialize reference_uploads first."),
        (
            "stored_video",
            "The ledger holds no submitted task for brief 'sunrise-timelapse': materialize generation_task first.",
        ),
    ],
)
def test_an_asset_materialized_before_its_upstream_says_what_to_do(pipeline, emulator, asset, missing):
    pipeline.add_partitions(["sunrise-timelapse"])
    failed = pipeline.materialize([asset], "sunrise-timelapse", raise_on_error=False)
    assert failure_text(failed) == missing
    assert emulator.stats()["creates_performed"] == 0


def test_one_run_of_all_four_assets_records_the_task_end_it_waited_for(pipeline, emulator):
    """As the UI's "Materialize all" does: stored_video waits for the task itself, before any sensor poll."""
    pipeline.add_partitions(["sunrise-timelapse"])
    result = pipeline.materialize(ASSETS, "sunrise-timelapse")

    created = materialization(result, "generation_task")
    assert (created["status"], created["final_credits"]) == ("queued", 0)  # what the create answered
    (ended,) = observed(result, "generation_task")
    assert ended == {
        "partition": "sunrise-timelapse",
        "task_id": created["task_id"],
        "status": "succeeded",
        "reserved_credits": KLING_PRICE,
        "final_credits": KLING_PRICE,
        "refunded_credits": 0,
    }
    record = pipeline.ledger.find_by_task(created["task_id"])
    assert (record.status, record.final_credits, record.stored_uri is not None) == ("succeeded", KLING_PRICE, True)
    polls = emulator.stats()["requests"].get("get_generation", 0)
    assert pipeline.tick().asset_events == [] and emulator.stats()["requests"].get("get_generation", 0) == polls


def test_one_run_of_all_four_assets_records_a_failed_task_with_its_refund(pipeline, emulator, s3_bucket):
    pipeline.write_brief("doomed.yaml", DOOMED_BRIEF)
    pipeline.add_partitions(["doomed-balloon"])
    result = pipeline.materialize(ASSETS, "doomed-balloon", raise_on_error=False)

    assert not result.success and "failed (generation_failed)" in failure_text(result)
    (ended,) = observed(result, "generation_task")
    assert (ended["status"], ended["error_code"], ended["refunded_credits"]) == ("failed", "generation_failed", 90)
    record = pipeline.ledger.latest_for_brief("doomed-balloon")
    assert (record.status, record.refunded_credits, record.stored_uri) == ("failed", KLING_PRICE, None)
    assert s3_keys(s3_bucket, f"{pipeline.settings.s3_prefix}/doomed-balloon/") == []


def test_rerun_of_an_unchanged_brief_reattaches_instead_of_paying_again(pipeline, emulator):
    first = materialization(pipeline.submit("product-spin"), "generation_task")
    charges = emulator.stats()["charges"]

    alone = materialization(pipeline.materialize([generation_task], "product-spin"), "generation_task")
    whole = materialization(pipeline.submit("product-spin"), "generation_task")

    assert [m["action"] for m in (first, alone, whole)] == ["new", "reattach", "reattach"]
    assert {(m["task_id"], m["idempotency_key"]) for m in (first, alone, whole)} == {
        (first["task_id"], first["idempotency_key"])
    }
    stats = emulator.stats()
    assert stats["creates_performed"] == 1
    assert stats["charges"] == charges
    assert stats["uploads_performed"] == 2  # the free upload is repeated; the paid create is not


def test_headless_run_twice_stores_every_brief_once(pipeline, emulator):
    def headless_run():
        run = HeadlessRun(settings=pipeline.settings, instance=pipeline.instance)
        return {o.brief_id: o for o in run.run(load_briefs(pipeline.requests_path), timeout_seconds=60)}

    first = headless_run()
    second = headless_run()

    for outcomes in (first, second):
        assert {brief_id: o.status for brief_id, o in outcomes.items()} == dict.fromkeys(SAMPLE_BRIEFS, "stored")
    assert {b: (o.task_id, o.s3_uri) for b, o in second.items()} == {b: (o.task_id, o.s3_uri) for b, o in first.items()}
    stats = emulator.stats()
    assert stats["creates_performed"] == 3
    assert len(stats["charges"]) == 3


def test_discovery_schedule_launches_new_and_changed_briefs_and_skips_invalid_ones(pipeline, capsys):
    tick = datetime(2026, 5, 11, 8, tzinfo=UTC)
    pipeline.write_brief("too-short.yaml", INVALID_BRIEF)

    first = pipeline.discover(tick)
    assert {r.partition_key for r in first.run_requests} == set(SAMPLE_BRIEFS)
    assert set(pipeline.instance.get_dynamic_partitions("briefs")) == set(SAMPLE_BRIEFS)
    assert len({r.tags[BATCH_TAG] for r in first.run_requests}) == 1
    assert "skipped invalid brief" in capsys.readouterr().err  # Dagster's console logger

    for request in first.run_requests:
        pipeline.record_launch(request)
    unchanged = pipeline.discover(tick + timedelta(hours=1))
    assert unchanged.run_requests == []
    assert unchanged.skip_message

    pipeline.write_brief("harbour.yaml", NEW_BRIEF)
    added = pipeline.discover(tick + timedelta(hours=2))
    assert [r.partition_key for r in added.run_requests] == ["harbour-dusk"]
    assert "harbour-dusk" in pipeline.instance.get_dynamic_partitions("briefs")
    pipeline.record_launch(added.run_requests[0])

    sunrise = pipeline.requests_path / "text-only.yaml"
    sunrise.write_text(sunrise.read_text().replace("Timelapse of sunrise", "Timelapse of sunset"))
    edited = pipeline.discover(tick + timedelta(hours=3))
    (request,) = edited.run_requests
    assert request.partition_key == "sunrise-timelapse"
    (original,) = [r for r in first.run_requests if r.partition_key == "sunrise-timelapse"]
    assert request.run_key != original.run_key


def test_per_run_credit_limit_holds_across_the_runs_of_one_discovery_tick(make_pipeline, emulator):
    pipeline = make_pipeline(max_credits_per_run=KLING_PRICE)
    requests = pipeline.discover(datetime(2026, 5, 11, 8, tzinfo=UTC)).run_requests

    results = [pipeline.submit(r.partition_key, dict(r.tags), raise_on_error=False) for r in requests]

    assert [r.success for r in results] == [True, False, False]
    for refused in results[1:]:
        assert "per-run credit limit" in failure_text(refused)
    assert emulator.stats()["creates_performed"] == 1


def test_run_that_fails_before_its_first_step_reports_why(pipeline, emulator, monkeypatch):
    def database_gone(instance, pool):
        raise OperationalError("SELECT concurrency_key", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(resources, "ensure_pool_row", database_gone)

    failed = pipeline.submit("sunrise-timelapse", raise_on_error=False)

    assert not failed.success and not failed.get_step_failure_events()
    assert failure_text(failed) == (
        "sqlalchemy.exc.OperationalError: (builtins.Exception) server closed the connection unexpectedly"
    )
    assert emulator.stats()["creates_performed"] == 0


def test_sensor_requests_the_same_store_run_on_every_tick_until_stored(pipeline):
    pipeline.submit("sunrise-timelapse")
    (request,) = pipeline.store_requests(pipeline.tick_until(pipeline.store_requests)).values()

    again = pipeline.tick()
    assert [(r.run_key, r.job_name, r.run_config) for r in again.run_requests] == [
        (request.run_key, "store_videos", request.run_config)
    ]

    pipeline.launch(request)
    after = pipeline.tick()
    assert after.run_requests == []
    assert after.skip_message


def test_task_past_its_deadline_is_reported_timed_out_and_no_longer_polled(pipeline, configure_emulator, monkeypatch):
    emulator = configure_emulator(queued_seconds=0.1, processing_seconds=24 * 3600)
    task_id = materialization(pipeline.submit("sunrise-timelapse"), "generation_task")["task_id"]
    pipeline.tick_until(lambda ticks: emulator.stats()["polls"].get(task_id))
    polls = emulator.stats()["polls"][task_id]

    deadline = timedelta(minutes=pipeline.settings.task_deadline_minutes)
    monkeypatch.setattr(polling, "utc_now", lambda: datetime.now(UTC) + deadline + timedelta(minutes=1))
    late = pipeline.tick()
    later = pipeline.tick()

    (timed_out,) = observations([late], "timed_out")
    assert (timed_out["partition"], timed_out["task_id"]) == ("sunrise-timelapse", task_id)
    assert late.run_requests == []
    assert later.asset_events == [] and later.skip_message
    assert emulator.stats()["polls"][task_id] == polls
    assert pipeline.ledger.find_by_task(task_id).status == "timed_out"


def test_dagster_validates_the_definitions(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIVYA_")} | {"DAGSTER_HOME": str(tmp_path)}
    dagster = Path(sys.executable).parent / "dagster"

    done = subprocess.run(
        [str(dagster), "definitions", "validate", "-m", "rivya_pipeline.definitions"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation successful" in done.stdout + done.stderr


# Every setting at a value no default has, so that one a resource did not take would show.
DISTINCT_SETTINGS = Settings(
    requests_path=Path("/srv/briefs"),
    base_url="https://rivya.example",
    s3_bucket="campaign-videos",
    s3_prefix="spring",
    s3_endpoint_url="https://s3.example",
    s3_region="eu-west-3",
    s3_checksum_when_required=True,
    s3_chunk_mb=16,
    max_credits_per_run=180,
    max_credits_per_day=900,
    min_wallet_credits=45,
    ledger_url="sqlite:////srv/ledger.sqlite",
    allow_local_media=True,
    max_media_mb=512,
    task_deadline_minutes=45,
    discovery_cron="*/10 * * * *",
    poll_requests_per_second=7.0,
    poll_concurrency=3,
    request_timeout_seconds=12.0,
    store_retry_first_seconds=30.0,
    store_retry_max_seconds=600.0,
    store_window_hours=12.0,
    relaunch_first_seconds=20.0,
    partition_ceiling=5000,
    black_pixel_luma=0.15,
    black_picture_share=0.95,
    black_max_seconds=3.0,
    black_max_fraction=0.4,
    freeze_noise_db=-50.0,
    freeze_max_seconds=4.0,
    silence_max_dbfs=-70.0,
)


def test_every_setting_reaches_the_resource_field_of_its_name():
    resources = [r for r in build_resources(DISTINCT_SETTINGS).values() if isinstance(r, ConfigurableResource)]
    configured = {name: getattr(resource, name) for resource in resources for name in type(resource).model_fields}
    settings = {field.name: getattr(DISTINCT_SETTINGS, field.name) for field in dataclasses.fields(Settings)}

    assert configured.keys() - settings.keys() == {"api_key"}  # only ever from the environment, by EnvVar
    assert settings.keys() - configured.keys() == {"discovery_cron"}  # the schedule's
    assert {name: configured[name] for name in settings.keys() - {"discovery_cron"}} == {
        name: str(value) if isinstance(value, Path) else value
        for name, value in settings.items()
        if name != "discovery_cron"
    }
    (rivya,) = [r for r in resources if isinstance(r, RivyaResource)]
    assert rivya.api_key == EnvVar("RIVYA_API_KEY")


def test_every_resource_field_has_a_description_for_the_ui():
    repository = build_definitions(DISTINCT_SETTINGS).get_repository_def()
    schemas = {key: r.config_schema.config_type for key, r in repository.get_top_level_resources().items()}

    described = {
        f"{key}.{name}": bool(field.description)
        for key, schema in schemas.items()
        if isinstance(schema, Shape)
        for name, field in schema.fields.items()
    }

    assert {name.split(".")[0] for name in described} == {
        "rivya",
        "credit_limits",
        "ledger",
        "video_storage",
        "video_qc",
        "briefs",
    }
    assert [name for name, has_one in described.items() if not has_one] == []


def test_a_store_that_keeps_failing_is_retried_under_new_keys_until_its_window_ends_then_reported(make_pipeline):
    """Failure mode: three immediate retries spent inside a 3-minute outage, and the paid video never stored."""
    # Waits of 2 s then 4 s within a window of 14 s from the success: the tick just after a failure is surely inside
    # its wait, even on a loaded machine (with the fast 0.2 s wait, a slow tick was past it: seen once under load).
    pipeline = make_pipeline(store_window_hours=14 / 3600, store_retry_first_seconds=2.0, store_retry_max_seconds=4.0)
    task_id = materialization(pipeline.submit("sunrise-timelapse"), "generation_task")["task_id"]
    (first,) = pipeline.store_requests(pipeline.tick_until(pipeline.store_requests)).values()
    pipeline.emulator.set_faults([FaultRule(endpoint="media", kind="server_error", status=503)])

    keys, request, result = [first.run_key], first, None
    while request is not None:
        result = pipeline.launch(request, raise_on_error=False)
        assert not result.success
        record = pipeline.ledger.find_by_task(task_id)
        if record.store_due_at is None:
            break
        assert pipeline.tick().run_requests == []  # not due until its backoff passed
        (request,) = pipeline.tick_until(lambda ticks: ticks[-1].run_requests)[-1].run_requests
        keys.append(request.run_key)

    assert first.job_name == "store_videos"
    assert keys[:3] == [first.run_key, f"{task_id}:store", f"{task_id}:store:retry1"]
    assert len(set(keys)) == len(keys) == record.store_attempts >= 3
    assert record.store_gave_up_at is not None and record.stored_uri is None
    (observation,) = [e for e in result.get_asset_observation_events() if e.asset_key == AssetKey("stored_video")]
    report = metadata_values(observation.asset_observation_data.asset_observation)
    assert report[STORE_FAILED].startswith(f"Result video of task {task_id} not stored")
    assert report["next"].startswith(f"Given up after {len(keys)} attempt(s)")
    assert "materialize stored_video for this partition" in failure_text(result)
    pipeline.emulator.set_faults([])
    assert pipeline.tick().run_requests == []  # never in the store queue again
    assert pipeline.materialize([stored_video], "sunrise-timelapse").success  # what the report says to do
    assert pipeline.ledger.find_by_task(task_id).stored_uri is not None


def test_no_store_run_is_requested_while_a_run_of_the_partition_is_storing(pipeline):
    """A launch of all four assets from the UI stores the video itself: the sensor must not launch a second copy."""
    pipeline.submit("sunrise-timelapse")
    manual = create_run_for_test(
        pipeline.instance,
        status=DagsterRunStatus.STARTED,
        tags={"dagster/partition": "sunrise-timelapse"},
        asset_selection={AssetKey("stored_video")},
    )
    pipeline.tick_until(lambda ticks: pipeline.ledger.due_for_store(utc_now(), limit=10))
    assert pipeline.tick().run_requests == []

    pipeline.instance.report_run_failed(manual)
    assert pipeline.store_requests([pipeline.tick()]).keys() == {"sunrise-timelapse"}


def test_the_credit_limits_page_in_the_ui_says_spend_is_unbounded_without_a_daily_cap():
    def page(settings: Settings) -> str:
        return build_definitions(settings).get_repository_def().get_top_level_resources()["credit_limits"].description

    assert page(dataclasses.replace(DISTINCT_SETTINGS, max_credits_per_day=None)).startswith(UNBOUNDED_SPEND)
    assert UNBOUNDED_SPEND not in page(DISTINCT_SETTINGS)  # a cap of 900 credits a day
    assert page(DISTINCT_SETTINGS).startswith("Spend caps checked before every paid submit")
