"""`brief_discovery`: the scheduled pipeline run. Finds new or changed briefs and launches their runs.

Evaluating it has no effect that a later tick depends on: which versions were launched is read from Dagster's
own record of runs (each run carries its brief version in a tag), never written by the evaluation. So the UI's
"Test Schedule", a tick evaluated again after the daemon died, or a tick whose run submission failed, never hide
a brief from the next tick. Dagster itself makes a re-evaluated tick safe: within one tick, a run key that already
has a run is not launched again, and a run it created but did not submit yet is submitted then.
"""

from dagster import (
    AssetSelection,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from ..briefs import Brief, scan_briefs
from ..settings import utc_now
from .assets import BATCH_TAG, BRIEF_PARTITIONS, generation_task, reference_uploads, video_brief
from .resources import BriefsResource

PARTITION_BATCH = 1000  # SQLite refuses statements with tens of thousands of variables
# On every run that submits a brief: which version of it ("<brief id>:<content hash, 16 hex>") the run is for.
VERSION_TAG = "rivya/brief_version"
# Runs launched before VERSION_TAG existed carry the version as their run key.
RUN_KEY_TAG = "dagster/run_key"


def brief_version(brief: Brief) -> str:
    return f"{brief.id}:{brief.content_hash[:16]}"


def add_brief_partitions(instance: DagsterInstance, brief_ids: list[str]) -> None:
    """Add a partition for each brief that has none yet, in batches (idempotent: a repeated call adds nothing)."""
    existing = set(instance.get_dynamic_partitions(BRIEF_PARTITIONS))
    new_keys = [brief_id for brief_id in brief_ids if brief_id not in existing]
    for start in range(0, len(new_keys), PARTITION_BATCH):
        instance.add_dynamic_partitions(BRIEF_PARTITIONS, new_keys[start : start + PARTITION_BATCH])


def launched_versions(instance: DagsterInstance) -> set[str]:
    """The brief versions that have a run Dagster has submitted, whatever became of it.

    A run created but never submitted (NOT_STARTED: the daemon died in between) does not count: the tick that made
    it is evaluated again and Dagster submits that very run; counting it would leave it waiting forever."""
    tagged = dict(instance.get_run_tags(tag_keys=[VERSION_TAG, RUN_KEY_TAG]))
    launched = tagged.get(VERSION_TAG, set()) | tagged.get(RUN_KEY_TAG, set())
    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.NOT_STARTED])):
        launched.discard(run.tags.get(VERSION_TAG) or run.tags.get(RUN_KEY_TAG, ""))
    return launched


def build_discovery_schedule(cron: str) -> ScheduleDefinition:
    @schedule(
        name="brief_discovery",
        cron_schedule=cron,
        target=AssetSelection.assets(video_brief, reference_uploads, generation_task),
        default_status=DefaultScheduleStatus.RUNNING,
        description="Scans the briefs folder; adds a partition per new brief and launches a run for every brief "
        "version that has no run yet (run key and tag = brief id + content hash, so one version is never launched "
        "twice). Evaluating it launches nothing by itself: a test evaluation hides no brief from later ticks.",
    )
    def brief_discovery(context: ScheduleEvaluationContext, briefs: BriefsResource) -> list[RunRequest] | SkipReason:
        found, errors = scan_briefs(briefs.folder())
        for error in errors:
            context.log.warning(f"skipped invalid brief: {error}")
        launched = launched_versions(context.instance)
        fresh = [b for b in found if brief_version(b) not in launched]
        if not fresh:
            return SkipReason(f"{len(found)} brief(s), none new or changed; {len(errors)} invalid")
        add_brief_partitions(context.instance, [b.id for b in fresh])
        tick_time = context.scheduled_execution_time or utc_now()
        batch = f"discovery-{tick_time:%Y%m%dT%H%M%S}"
        return [
            RunRequest(
                run_key=brief_version(b),
                partition_key=b.id,
                tags={BATCH_TAG: batch, VERSION_TAG: brief_version(b)},
            )
            for b in fresh
        ]

    return brief_discovery
