"""`brief_discovery`: the scheduled pipeline run. Finds new or changed briefs and launches their runs."""

from dagster import (
    AssetSelection,
    DagsterInstance,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from ..briefs import scan_briefs
from ..settings import utc_now
from .assets import BATCH_TAG, BRIEF_PARTITIONS, generation_task, reference_uploads, video_brief
from .resources import BriefsResource, LedgerResource

PARTITION_BATCH = 1000  # SQLite refuses statements with tens of thousands of variables


def add_brief_partitions(instance: DagsterInstance, brief_ids: list[str]) -> None:
    """Add a partition for each brief that has none yet, in batches."""
    existing = set(instance.get_dynamic_partitions(BRIEF_PARTITIONS))
    new_keys = [brief_id for brief_id in brief_ids if brief_id not in existing]
    for start in range(0, len(new_keys), PARTITION_BATCH):
        instance.add_dynamic_partitions(BRIEF_PARTITIONS, new_keys[start : start + PARTITION_BATCH])


def build_discovery_schedule(cron: str) -> ScheduleDefinition:
    @schedule(
        name="brief_discovery",
        cron_schedule=cron,
        target=AssetSelection.assets(video_brief, reference_uploads, generation_task),
        default_status=DefaultScheduleStatus.RUNNING,
        description="Scans the briefs folder; adds a partition per new brief and launches a run for every new or "
        "changed brief (run key = brief id + content hash, so one version is never launched twice).",
    )
    def brief_discovery(
        context: ScheduleEvaluationContext, briefs: BriefsResource, ledger: LedgerResource
    ) -> list[RunRequest] | SkipReason:
        found, errors = scan_briefs(briefs.folder())
        for error in errors:
            context.log.warning(f"skipped invalid brief: {error}")
        registry = ledger.for_instance(context.instance)
        known = registry.brief_versions()
        fresh = [b for b in found if known.get(b.id) != b.content_hash]
        if not fresh:
            return SkipReason(f"{len(found)} brief(s), none new or changed; {len(errors)} invalid")
        add_brief_partitions(context.instance, [b.id for b in fresh])
        tick_time = context.scheduled_execution_time or utc_now()
        batch = f"discovery-{tick_time:%Y%m%dT%H%M%S}"
        requests = [
            RunRequest(run_key=f"{b.id}:{b.content_hash[:16]}", partition_key=b.id, tags={BATCH_TAG: batch})
            for b in fresh
        ]
        registry.record_brief_versions({b.id: b.content_hash for b in fresh})
        return requests

    return brief_discovery
