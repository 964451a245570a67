"""Nothing paid for is lost when a service is down for a while: the media host, S3 or Rivya itself.

The real definitions on a real instance, driven tick by tick as the daemon drives them (every run a tick asks for
is launched), against the emulator and the S3 server over HTTP. Outages run on a scaled clock: the emulator's
(`time_scale`: a "3-minute" outage lasts 3 s) and the store backoff's (0.2 s doubling to 1 s, see
FAST_STORE_RETRY), so each test takes seconds while keeping the order of events of the real minutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from dagster import DagsterRunStatus

from rivya_pipeline.briefs import Brief, load_briefs
from rivya_pipeline.emulator import FaultRule
from rivya_pipeline.emulator.s3_fault_proxy import S3FaultProxy
from rivya_pipeline.headless import HeadlessRun
from rivya_pipeline_tests.fixtures_pipeline import FAST_LIFECYCLE, SAMPLE_BRIEFS, Pipeline
from rivya_pipeline_tests.helpers import KLING_PRICE, s3_keys

TIME_SCALE = 60  # emulated seconds per real second: a 3-minute outage lasts 3 s
GIVE_UP_SECONDS = 60.0
REFUSED_TICKS = 20  # how many sensor ticks the run queue refuses every run for


def run_like_the_daemon(pipeline: Pipeline, done: Callable[[], bool]) -> int:
    """Tick the sensor and launch every run it asks for, until `done()`; returns the number of ticks."""
    give_up, ticks = time.monotonic() + GIVE_UP_SECONDS, 0
    while not done():
        assert time.monotonic() < give_up, f"not done after {ticks} ticks: {pipeline.ledger.count_by_status()}"
        for request in pipeline.tick().run_requests:
            pipeline.launch(request, raise_on_error=False)
        ticks += 1
        time.sleep(0.2)
    return ticks


def submit_samples(pipeline: Pipeline) -> dict[str, str]:
    """Buy each sample brief's task (the API is up); brief id -> idempotency key."""
    keys = {}
    for brief_id in SAMPLE_BRIEFS:
        assert pipeline.submit(brief_id).success
        keys[brief_id] = pipeline.ledger.latest_for_brief(brief_id).idempotency_key
    return keys


def all_stored(pipeline: Pipeline, keys: dict[str, str]) -> Callable[[], bool]:
    return lambda: all(pipeline.ledger.get(key).stored_uri for key in keys.values())


def assert_each_bought_and_stored_once(pipeline: Pipeline, keys: dict[str, str], s3_bucket) -> None:
    records = [pipeline.ledger.get(key) for key in keys.values()]
    assert [c["credits"] for c in pipeline.emulator.stats()["charges"]] == [KLING_PRICE] * len(keys)
    assert all(r.stored_uri and r.store_due_at is None and r.store_gave_up_at is None for r in records)
    prefix = pipeline.settings.s3_prefix
    videos = {b: [k for k in s3_keys(s3_bucket, f"{prefix}/{b}/") if k.endswith(".mp4")] for b in keys}
    assert {b: len(found) for b, found in videos.items()} == dict.fromkeys(keys, 1)


@pytest.fixture
def scaled_emulator(configure_emulator):
    return configure_emulator(**FAST_LIFECYCLE, time_scale=TIME_SCALE)


def test_media_host_down_for_three_minutes_then_every_paid_video_is_stored(pipeline, scaled_emulator, s3_bucket):
    """Failure mode: 12 paid videos, a 3-minute CDN outage, every store attempt spent inside it, 0 stored after."""
    keys = submit_samples(pipeline)
    scaled_emulator.set_faults([FaultRule(endpoint="media", kind="server_error", status=503, for_seconds=180)])

    run_like_the_daemon(pipeline, all_stored(pipeline, keys))

    assert_each_bought_and_stored_once(pipeline, keys, s3_bucket)
    # The outage opened at the first download and met at least that store; which others it met depends on the
    # machine's pace (the backoff's timing is the ledger tests' business), but none of them was lost to it.
    failed = sum(pipeline.ledger.get(key).store_attempts for key in keys.values())
    assert failed >= scaled_emulator.stats()["faults_injected"]["media:server_error"] >= 1


def test_media_host_that_hangs_is_given_up_on_per_attempt_and_tried_again(make_pipeline, scaled_emulator, s3_bucket):
    """Failure mode: a download that never answers holds the store run forever."""
    pipeline = make_pipeline(request_timeout_seconds=0.5)  # media downloads time out after 4 x 0.5 s
    keys = submit_samples(pipeline)
    scaled_emulator.set_faults([FaultRule(endpoint="media", kind="slow", delay=4.0, for_seconds=120)])

    run_like_the_daemon(pipeline, all_stored(pipeline, keys))

    assert_each_bought_and_stored_once(pipeline, keys, s3_bucket)
    assert max(pipeline.ledger.get(key).store_attempts for key in keys.values()) >= 1


@pytest.fixture
def s3_proxy(s3_endpoint_url: str) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_endpoint_url, {}, seed=1) as proxy:
        yield proxy


def test_s3_refusing_every_request_longer_than_boto3_retries_then_every_video_is_stored(
    make_pipeline, scaled_emulator, s3_bucket, s3_proxy
):
    """Failure mode: S3 throttling (503 SlowDown) outlasting boto3's own retries ended the store for good."""
    pipeline = make_pipeline(s3_endpoint_url=s3_proxy.url)
    keys = submit_samples(pipeline)
    # Longer than boto3's own retries of one request (3 attempts, at most 1 + 2 s apart), so that a store fails.
    s3_proxy.go_down(6.0)

    run_like_the_daemon(pipeline, all_stored(pipeline, keys))

    assert_each_bought_and_stored_once(pipeline, keys, s3_bucket)
    assert sum(s3_proxy.injected().values()) > 0
    assert max(pipeline.ledger.get(key).store_attempts for key in keys.values()) >= 1


def test_rivya_down_for_five_minutes_polls_back_off_and_everything_is_stored_once(
    pipeline, configure_emulator, s3_bucket
):
    """Failure mode: every pending task polled on every tick against a dead API, spending each tick's budget."""
    emulator = configure_emulator(queued_seconds=30, processing_seconds=30, time_scale=TIME_SCALE)
    keys = submit_samples(pipeline)
    emulator.set_faults([FaultRule(endpoint="api", kind="public_api_disabled", for_seconds=300)])
    before = emulator.stats()["requests"].get("get_generation", 0)

    ticks_while_down = run_like_the_daemon(pipeline, lambda: not any_open(emulator) and opened(emulator))
    polls_while_down = emulator.stats()["requests"].get("get_generation", 0) - before
    run_like_the_daemon(pipeline, all_stored(pipeline, keys))

    assert_each_bought_and_stored_once(pipeline, keys, s3_bucket)
    # One probe per tick at most (the poll client tries twice), never a poll of every pending task.
    assert polls_while_down <= 2 * ticks_while_down
    assert emulator.stats()["creates_performed"] == len(keys)


def any_open(emulator) -> bool:
    return any(w["state"] == "open" for w in emulator.stats()["fault_windows"])


def opened(emulator) -> bool:
    return all(w["state"] != "pending" for w in emulator.stats()["fault_windows"])


def test_run_waits_out_a_store_outage_within_its_timeout(pipeline, scaled_emulator, s3_bucket):
    scaled_emulator.set_faults([FaultRule(endpoint="media", kind="server_error", status=503, for_seconds=150)])
    run = HeadlessRun(settings=pipeline.settings, instance=pipeline.instance)

    outcomes = run.run(run_briefs(pipeline), timeout_seconds=GIVE_UP_SECONDS)

    assert {o.brief_id: o.status for o in outcomes} == dict.fromkeys(SAMPLE_BRIEFS, "stored")
    assert max(pipeline.ledger.latest_for_brief(b).store_attempts for b in SAMPLE_BRIEFS) >= 1
    assert len(scaled_emulator.stats()["charges"]) == len(SAMPLE_BRIEFS)


def run_briefs(pipeline: Pipeline) -> list[Brief]:
    return [b for b in load_briefs(pipeline.requests_path) if b.id in SAMPLE_BRIEFS]


def test_a_later_run_stores_what_an_earlier_one_could_not(pipeline, scaled_emulator, s3_bucket):
    """Failure mode: a cron `run` that met an outage left its paid videos for a person to store."""
    scaled_emulator.set_faults([FaultRule(endpoint="media", kind="server_error", status=503)])
    first = HeadlessRun(settings=pipeline.settings, instance=pipeline.instance).run(run_briefs(pipeline), 6.0)
    assert {o.status for o in first} == {"store_failed"}
    assert all("tries again from" in (o.error or "") for o in first)

    scaled_emulator.set_faults([])
    second = HeadlessRun(settings=pipeline.settings, instance=pipeline.instance).run(run_briefs(pipeline), 60.0)

    assert {o.status for o in second} == {"stored"}
    assert len(scaled_emulator.stats()["charges"]) == len(SAMPLE_BRIEFS)  # bought by the first run only


def test_a_video_whose_store_window_ran_out_is_reported_with_what_to_do(make_pipeline, scaled_emulator, s3_bucket):
    pipeline = make_pipeline(store_window_hours=2 / 3600)  # 2 s on the tests' clock
    scaled_emulator.set_faults([FaultRule(endpoint="media", kind="server_error", status=503)])

    outcomes = HeadlessRun(settings=pipeline.settings, instance=pipeline.instance).run(run_briefs(pipeline), 30.0)

    assert {o.status for o in outcomes} == {"store_gave_up"}
    assert all("materialize stored_video for this partition" in (o.error or "") for o in outcomes)
    assert sorted(r.brief_id for r in pipeline.ledger.gave_up_storing()) == sorted(SAMPLE_BRIEFS)
    assert pipeline.ledger.due_for_store(pipeline.ledger.gave_up_storing()[0].store_gave_up_at, limit=10) == []


def test_store_runs_refused_at_launch_back_off_and_the_video_is_stored_once_runs_launch_again(make_pipeline, s3_bucket):
    """Failure mode: the run queue refusing every run (the broker down): each store run failed at launch, recorded
    nothing in the ledger, and the sensor asked for another on every tick, for as long as the outage lasted."""
    pipeline = make_pipeline(store_retry_max_seconds=60.0)  # doubling all along: slow ticks still meet waits
    keys = submit_samples(pipeline)
    retry = pipeline.definitions.resources["video_storage"].retry_policy()
    started, ticks, refused = time.monotonic(), 0, 0
    while ticks < REFUSED_TICKS:
        for request in pipeline.tick().run_requests:
            pipeline.record_launch(request, DagsterRunStatus.FAILURE)
            refused += 1
        ticks += 1
    elapsed = time.monotonic() - started

    run_like_the_daemon(pipeline, all_stored(pipeline, keys))

    # Per video a batch (each joins one as its task succeeds), then its own run after each wait of the store
    # backoff that fits in the outage.
    waits, fitting = 0.0, 0
    while waits + retry.wait_after(fitting + 1).total_seconds() <= elapsed:
        fitting += 1
        waits += retry.wait_after(fitting).total_seconds()
    bound = len(keys) * (2 + fitting)
    assert refused <= bound < ticks * len(keys)  # without the backoff: a run per video and tick
    assert_each_bought_and_stored_once(pipeline, keys, s3_bucket)
