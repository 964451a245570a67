"""Discovery never hides a brief: evaluating `brief_discovery` without launching (the UI's "Test Schedule", a tick
evaluated again after the daemon died, a run submission that failed) leaves every brief for the next tick, and a
version that has a run is never launched again. The real schedule definition on a real instance; runs are the
record the daemon leaves (`Pipeline.record_launch`), or real runs of the headless command."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from dagster import DagsterRunStatus, RunsFilter
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql, infer_schedule_selector

from rivya_pipeline.briefs import load_briefs
from rivya_pipeline.defs.assets import NOT_SUBMITTED_TAG
from rivya_pipeline.defs.schedules import MAX_RELAUNCHES, RELAUNCH_TAG, VERSION_TAG, brief_version, relaunches
from rivya_pipeline.defs.sensors import run_ended_at
from rivya_pipeline.emulator import FaultRule
from rivya_pipeline.headless import HeadlessRun
from rivya_pipeline.settings import REPO_ROOT
from rivya_pipeline_tests.fixtures_pipeline import FAST_RELAUNCH, SAMPLE_BRIEFS

TICK = datetime(2026, 5, 11, 8, tzinfo=UTC)


def partitions(requests) -> set[str]:
    return {r.partition_key for r in requests}


def test_test_evaluations_of_discovery_hide_no_brief_from_the_next_tick(pipeline):
    """Failure mode: "Test Schedule" twice in the UI, then 7 minutes of daemon ticks launched 0 of 6 new briefs."""
    tested = [pipeline.discover(TICK) for _ in range(2)]  # evaluated, nothing launched

    ticked = pipeline.discover(TICK + timedelta(hours=1))

    assert [partitions(t.run_requests) for t in tested] == [set(SAMPLE_BRIEFS)] * 2
    assert partitions(ticked.run_requests) == set(SAMPLE_BRIEFS)
    assert pipeline.instance.get_runs_count() == 0


def test_a_version_with_a_run_going_done_or_refused_is_never_launched_again(pipeline):
    first = pipeline.discover(TICK).run_requests
    launches = [
        (DagsterRunStatus.SUCCESS, {}),
        (DagsterRunStatus.FAILURE, {NOT_SUBMITTED_TAG: "BudgetExceeded"}),  # generation_task refused on purpose
        (DagsterRunStatus.STARTED, {}),
    ]
    for request, (status, step_tags) in zip(first, launches, strict=True):
        pipeline.record_launch(request, status, step_tags)
    time.sleep(2 * FAST_RELAUNCH["relaunch_first_seconds"])  # past any relaunch's wait

    later = pipeline.discover(TICK + timedelta(hours=1))

    assert later.run_requests == [] and "none new or changed" in str(later.skip_message)
    assert {r.tags[VERSION_TAG] for r in first} == {r.run_key for r in first}


def test_a_version_whose_every_run_died_before_its_create_is_relaunched_three_times_at_most(pipeline):
    """Failure mode: a submit run killed with its worker or the daemon, or failed at launch while the broker was
    down, its run retries spent: no create was sent, and nothing else would ever submit the brief."""
    dead, *others = pipeline.discover(TICK).run_requests
    for request in others:
        pipeline.record_launch(request)
    pipeline.record_launch(dead, DagsterRunStatus.FAILURE)
    first_wait = FAST_RELAUNCH["relaunch_first_seconds"]

    relaunched = []
    for made in range(MAX_RELAUNCHES + 1):
        time.sleep(first_wait * 2**made + 0.1)
        requests = pipeline.discover(TICK + timedelta(hours=1 + made)).run_requests
        relaunched.append([(r.partition_key, r.run_key, r.tags[RELAUNCH_TAG], r.tags[VERSION_TAG]) for r in requests])
        for request in requests:
            pipeline.record_launch(request, DagsterRunStatus.FAILURE)

    version = str(dead.run_key)
    expected = [[(dead.partition_key, f"{version}:relaunch{n}", str(n), version)] for n in (1, 2, 3)]
    assert relaunched == [*expected, []]


def test_a_relaunch_waits_after_the_last_failure_and_twice_as_long_after_each_relaunch(pipeline):
    request = pipeline.discover(TICK).run_requests[0]
    brief = next(b for b in load_briefs(pipeline.requests_path) if b.id == request.partition_key)
    minute = timedelta(minutes=1)

    def failed_at(run_key: str) -> float:
        (record,) = pipeline.instance.get_run_records(RunsFilter(tags={"dagster/run_key": run_key}))
        return run_ended_at(record)

    def relaunched_after(run_key: str, seconds: float) -> list[int]:
        now = datetime.fromtimestamp(failed_at(run_key) + seconds, UTC)
        return [r.number for r in relaunches(pipeline.instance, pipeline.ledger, [brief], now, minute)]

    pipeline.record_launch(request, DagsterRunStatus.FAILURE)
    assert (relaunched_after(str(request.run_key), 59), relaunched_after(str(request.run_key), 61)) == ([], [1])
    first = request.with_replaced_attrs(
        run_key=f"{request.run_key}:relaunch1", tags={**request.tags, RELAUNCH_TAG: "1"}
    )
    pipeline.record_launch(first, DagsterRunStatus.FAILURE)
    assert (relaunched_after(str(first.run_key), 119), relaunched_after(str(first.run_key), 121)) == ([], [2])


def test_a_version_whose_create_was_sent_is_left_to_the_ledger_and_never_relaunched(pipeline, emulator):
    """Failure mode: a relaunch next to the sensor's re-send of a create whose answer was lost (the ledger holds
    its row): a second buyer of the same brief."""
    request = next(r for r in pipeline.discover(TICK).run_requests if r.partition_key == "sunrise-timelapse")
    emulator.set_faults([FaultRule(endpoint="create_generation", kind="drop_connection")])
    result = pipeline.submit(request.partition_key, dict(request.tags), raise_on_error=False)
    time.sleep(2 * FAST_RELAUNCH["relaunch_first_seconds"])

    later = pipeline.discover(TICK + timedelta(hours=1))

    assert not result.success
    record = pipeline.ledger.latest_for_brief("sunrise-timelapse")
    assert record is not None and record.task_id is None  # sent, its answer lost: the re-send's to make
    assert "sunrise-timelapse" not in partitions(later.run_requests)


def test_a_run_whose_step_refused_on_purpose_is_tagged_and_its_version_never_relaunched(make_pipeline):
    pipeline = make_pipeline(max_credits_per_run=10)  # less than one create: the budget guard refuses
    request = next(r for r in pipeline.discover(TICK).run_requests if r.partition_key == "sunrise-timelapse")
    result = pipeline.submit(request.partition_key, dict(request.tags), raise_on_error=False)
    time.sleep(2 * FAST_RELAUNCH["relaunch_first_seconds"])

    later = pipeline.discover(TICK + timedelta(hours=1))

    assert not result.success
    assert pipeline.instance.get_run_by_id(result.run_id).tags[NOT_SUBMITTED_TAG] == "BudgetExceeded"
    assert "sunrise-timelapse" not in partitions(later.run_requests)


def test_a_brief_whose_run_failed_before_buying_is_bought_once_by_its_relaunch(pipeline, emulator):
    """Failure mode: the Files API failing every upload, the submit run failed with no create sent: once the API
    answers again, the relaunch buys the brief, and only once."""
    request = next(r for r in pipeline.discover(TICK).run_requests if r.partition_key == "product-spin")
    emulator.set_faults([FaultRule(endpoint="upload_file", kind="server_error", status=503)])
    failed = pipeline.submit(request.partition_key, dict(request.tags), raise_on_error=False)
    emulator.set_faults([])
    time.sleep(2 * FAST_RELAUNCH["relaunch_first_seconds"])

    (relaunch,) = [
        r for r in pipeline.discover(TICK + timedelta(hours=1)).run_requests if r.partition_key == "product-spin"
    ]
    bought = pipeline.submit(relaunch.partition_key, dict(relaunch.tags))
    time.sleep(2 * FAST_RELAUNCH["relaunch_first_seconds"])
    after = pipeline.discover(TICK + timedelta(hours=2))

    assert not failed.success and pipeline.ledger.get(request.run_key or "") is None
    assert relaunch.run_key == f"{request.run_key}:relaunch1" and bought.success
    assert [c["credits"] for c in emulator.stats()["charges"]] == [90]
    assert "product-spin" not in partitions(after.run_requests)


def test_a_run_the_daemon_created_but_never_submitted_is_requested_again_under_the_same_key(pipeline):
    """Failure mode: the daemon killed between creating a tick's runs and submitting them; its re-evaluated tick
    must name that run again (Dagster then submits the run it made), or the brief waits forever."""
    first = pipeline.discover(TICK).run_requests
    created, launched = first[0], first[1:]
    pipeline.record_launch(created, DagsterRunStatus.NOT_STARTED)
    for request in launched:
        pipeline.record_launch(request)

    again = pipeline.discover(TICK)

    assert [(r.partition_key, r.run_key) for r in again.run_requests] == [(created.partition_key, created.run_key)]


def test_an_edited_brief_is_launched_once_more_and_its_old_version_not_again(pipeline):
    for request in pipeline.discover(TICK).run_requests:
        pipeline.record_launch(request)
    sunrise = pipeline.requests_path / "text-only.yaml"
    sunrise.write_text(sunrise.read_text().replace("Timelapse of sunrise", "Timelapse of sunset"))

    (edited,) = pipeline.discover(TICK + timedelta(hours=1)).run_requests
    pipeline.record_launch(edited)

    assert edited.partition_key == "sunrise-timelapse"
    assert pipeline.discover(TICK + timedelta(hours=2)).run_requests == []


def test_runs_launched_before_the_version_tag_existed_still_count_as_launched(pipeline):
    """Failure mode: an upgrade that relaunches every brief of a year's folder once (the old runs carry the version
    only as their run key)."""
    for request in pipeline.discover(TICK).run_requests:
        legacy = request.with_replaced_attrs(tags={k: v for k, v in request.tags.items() if k != VERSION_TAG})
        pipeline.record_launch(legacy)

    assert pipeline.discover(TICK + timedelta(hours=1)).run_requests == []


def test_briefs_the_headless_command_bought_are_not_launched_again_by_discovery(pipeline, emulator):
    briefs = [b for b in load_briefs(pipeline.requests_path) if b.id == "sunrise-timelapse"]
    (outcome,) = HeadlessRun(settings=pipeline.settings, instance=pipeline.instance).run(briefs, timeout_seconds=60)

    requests = pipeline.discover(TICK).run_requests

    assert outcome.status == "stored"
    assert partitions(requests) == set(SAMPLE_BRIEFS) - {"sunrise-timelapse"}
    (submit_run,) = pipeline.instance.get_runs(RunsFilter(tags={VERSION_TAG: brief_version(briefs[0])}))
    assert submit_run.tags["dagster/partition"] == "sunrise-timelapse"
    assert len(emulator.stats()["charges"]) == 1


SCHEDULE_DRY_RUN = """
mutation ($selector: ScheduleSelector!, $timestamp: Float) {
  scheduleDryRun(selectorData: $selector, timestamp: $timestamp) {
    __typename
    ... on DryRunInstigationTick { evaluationResult { runRequests { runKey } skipReason error { message } } }
    ... on PythonError { message }
  }
}
"""


def test_test_schedule_in_the_ui_twice_then_the_tick_still_launches_every_brief(pipeline, monkeypatch):
    """The UI's own "Test Schedule" (GraphQL scheduleDryRun) against the code location in a code server process, as
    `dagster dev` serves it: evaluating twice launches nothing and hides nothing."""
    env = {"RIVYA_REQUESTS_PATH": str(pipeline.requests_path), "RIVYA_LEDGER_URL": pipeline.settings.ledger_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with define_out_of_process_context(str(REPO_ROOT / "workspace.yaml"), None, pipeline.instance) as context:
        selector = infer_schedule_selector(context, "brief_discovery")

        def test_schedule() -> set[str]:
            answer = execute_dagster_graphql(
                context, SCHEDULE_DRY_RUN, variables={"selector": selector, "timestamp": TICK.timestamp()}
            )
            result = answer.data["scheduleDryRun"]
            assert result["__typename"] == "DryRunInstigationTick", result
            return {r["runKey"] for r in result["evaluationResult"]["runRequests"]}

        tested = [test_schedule(), test_schedule()]

    assert tested[0] == tested[1] and len(tested[0]) == len(SAMPLE_BRIEFS)
    assert pipeline.instance.get_runs_count() == 0
    assert {r.run_key for r in pipeline.discover(TICK + timedelta(hours=1)).run_requests} == tested[0]


def test_discovery_warns_in_its_tick_once_the_partitions_reach_80_percent_of_the_ceiling(make_pipeline, capfd):
    """Failure mode: a year of briefs walks past Dagster's advised 100,000 partitions per asset, and the UI slows
    down with nothing having said so."""
    below = make_pipeline(partition_ceiling=4)  # the 3 sample briefs are 75% of it
    below.discover(TICK)
    assert "RIVYA_PARTITION_CEILING" not in capfd.readouterr().err  # the tick's log (Dagster's console logger)

    at = make_pipeline(partition_ceiling=3)
    at.write_brief("one-more.yaml", "id: one-more\nprompt: A fourth brief.\n")  # a new brief: partitions are added
    at.discover(TICK + timedelta(hours=1))
    assert "WARNING - 4 briefs partitions, 133% of RIVYA_PARTITION_CEILING=3" in capfd.readouterr().err
