"""The partition lifecycle's last step: `retire` removes the partitions of briefs that left the folder long after
their videos were stored, and deletes nothing else; a retired brief that comes back gets its partition (and its
history) again and is never bought twice. Real briefs bought and stored on the emulator and the S3 server, a real
instance, the UI's own GraphQL query."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dagster import AssetRecordsFilter, DagsterRunStatus, RunRequest
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

from rivya_pipeline.bench.growth_child import PARTITION_STATUS_QUERY
from rivya_pipeline.briefs import load_briefs
from rivya_pipeline.defs.assets import stored_video
from rivya_pipeline.headless import HeadlessRun
from rivya_pipeline.retirement import (
    KEPT_FILE_UNREADABLE,
    KEPT_NOT_STORED,
    KEPT_RECENT,
    KEPT_RUN_GOING,
    KEPT_WAITING,
    plan_retirement,
    retire_partitions,
)
from rivya_pipeline.settings import REPO_ROOT, utc_now
from rivya_pipeline_tests.helpers import s3_keys

TICK = datetime(2026, 5, 11, 8, tzinfo=UTC)
GONE = "sunrise-timelapse"  # requests/text-only.yaml holds it alone
GONE_FILE = "text-only.yaml"


def partitions(pipeline) -> set[str]:
    return set(pipeline.instance.get_dynamic_partitions("briefs"))


def buy_and_store_all(pipeline) -> None:
    outcomes = HeadlessRun(settings=pipeline.settings, instance=pipeline.instance).run(
        load_briefs(pipeline.requests_path), timeout_seconds=60
    )
    assert [o.status for o in outcomes] == ["stored"] * len(outcomes)


def ui_partition_stats(pipeline, monkeypatch) -> dict[str, int]:
    """stored_video's partition counts as the asset page asks for them, from a code server of the workspace."""
    monkeypatch.setenv("RIVYA_REQUESTS_PATH", str(pipeline.requests_path))
    monkeypatch.setenv("RIVYA_LEDGER_URL", pipeline.settings.ledger_url)
    with define_out_of_process_context(str(REPO_ROOT / "workspace.yaml"), None, pipeline.instance) as context:
        answer = execute_dagster_graphql(context, PARTITION_STATUS_QUERY)
    return answer.data["assetNodeOrError"]["partitionStats"]


def test_a_gone_stored_brief_is_retired_after_the_period_and_nothing_else_is_deleted(
    pipeline, emulator, s3_bucket, monkeypatch
):
    buy_and_store_all(pipeline)
    (pipeline.requests_path / GONE_FILE).unlink()
    stored = pipeline.ledger.tasks_of_briefs([GONE])[GONE]
    keys, runs = s3_keys(s3_bucket), pipeline.instance.get_runs_count()

    too_soon = plan_retirement(pipeline.instance, pipeline.ledger, pipeline.requests_path, stored_before=TICK)
    plan = plan_retirement(pipeline.instance, pipeline.ledger, pipeline.requests_path, stored_before=utc_now())
    retired = retire_partitions(pipeline.instance, plan)

    assert (too_soon.retire, too_soon.kept, too_soon.in_folder) == ([], {KEPT_RECENT: 1}, 2)
    assert retired == 1 and [r.brief_id for r in plan.retire] == [GONE]
    assert plan.retire[0].stored_uri == stored[0].stored_uri and plan.kept == {}
    assert partitions(pipeline) == {"city-morph", "product-spin"}
    # Nothing but the partition key is gone: the video and its sidecar, the ledger row, the runs, the events.
    assert s3_keys(s3_bucket) == keys and any(key.endswith(".json") for key in keys)
    assert pipeline.ledger.tasks_of_briefs([GONE])[GONE] == stored
    assert pipeline.instance.get_runs_count() == runs
    history = AssetRecordsFilter(asset_key=stored_video.key, asset_partitions=[GONE])
    assert len(pipeline.instance.fetch_materializations(history, limit=10).records) == 1
    assert ui_partition_stats(pipeline, monkeypatch) == {"numMaterialized": 2, "numPartitions": 2, "numFailed": 0}


def test_a_retired_brief_that_comes_back_gets_its_partition_and_history_and_is_not_bought_again(
    pipeline, emulator, monkeypatch
):
    buy_and_store_all(pipeline)
    text = (pipeline.requests_path / GONE_FILE).read_text()
    (pipeline.requests_path / GONE_FILE).unlink()
    retire_partitions(
        pipeline.instance,
        plan_retirement(pipeline.instance, pipeline.ledger, pipeline.requests_path, stored_before=utc_now()),
    )
    assert GONE not in partitions(pipeline)

    (pipeline.requests_path / GONE_FILE).write_text(text)
    back = pipeline.discover(TICK)

    assert back.run_requests == [] and "1 partition(s) added back" in str(back.skip_message)
    assert GONE in partitions(pipeline)
    assert len(emulator.stats()["charges"]) == 3  # the three of the first run; none for its return
    assert ui_partition_stats(pipeline, monkeypatch) == {"numMaterialized": 3, "numPartitions": 3, "numFailed": 0}

    (pipeline.requests_path / GONE_FILE).write_text(text.replace("prompt:", "regenerate: 1\nprompt:", 1))
    changed = pipeline.discover(TICK + timedelta(hours=1))

    assert [r.partition_key for r in changed.run_requests] == [GONE]  # a changed version is new work


def test_a_partition_is_kept_while_its_brief_is_in_the_folder_or_anything_of_it_may_still_happen(pipeline, emulator):
    """Kept: a brief still in the folder; one never bought; one whose task still waits on Rivya; one with a run of
    its partition going; one last seen in a file that now cannot be read (the brief may still be in it)."""
    buy_and_store_all(pipeline)
    pipeline.discover(TICK)  # indexes each brief's file
    pipeline.add_partitions(["never-bought"])
    pipeline.write_brief("waiting.yaml", "id: waiting\nprompt: A lighthouse at dusk.\n")
    pipeline.submit("waiting")  # its task is queued: no tick has polled it
    (pipeline.requests_path / "waiting.yaml").unlink()
    pipeline.record_launch(
        RunRequest(run_key="going", partition_key="city-morph", tags={}), status=DagsterRunStatus.STARTED
    )
    (pipeline.requests_path / "two-references.yaml").unlink()  # city-morph: its run is going
    (pipeline.requests_path / "one-reference.yaml").write_text('id: product-spin\nprompt: "never closed\n')

    plan = plan_retirement(pipeline.instance, pipeline.ledger, pipeline.requests_path, stored_before=utc_now())
    retired = retire_partitions(pipeline.instance, plan)

    assert retired == 0 and plan.retire == []
    assert plan.kept == {KEPT_NOT_STORED: 1, KEPT_WAITING: 1, KEPT_RUN_GOING: 1, KEPT_FILE_UNREADABLE: 1}
    assert plan.in_folder == 1  # sunrise-timelapse
    assert partitions(pipeline) == {"city-morph", "product-spin", "sunrise-timelapse", "never-bought", "waiting"}
