"""`brief_discovery`: the scheduled pipeline run. Finds new or changed briefs and launches their runs.

Evaluating it has no effect that a later tick depends on: which versions were launched is read from Dagster's
own record of runs (each run carries its brief version in a tag), never written by the evaluation. So the UI's
"Test Schedule", a tick evaluated again after the daemon died, or a tick whose run submission failed, never hide
a brief from the next tick. Dagster itself makes a re-evaluated tick safe: within one tick, a run key that already
has a run is not launched again, and a run it created but did not submit yet is submitted then.

A version whose every run failed before its create was sent (its run died with a worker or a daemon, never
reached a broker, or its retries were spent during an outage) has bought nothing and nothing else would ever
submit it: discovery launches it again, a few times, spaced out (`relaunches`). A run that reached the create has
a ledger row, and from there the sensor's re-send and store queue take over; a run whose step refused on purpose
(budget, a stale brief) is tagged NOT_SUBMITTED_TAG and is never relaunched.
"""

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from dagster import (
    AssetSelection,
    DagsterInstance,
    DagsterInvariantViolationError,
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRecord,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from ..batching import chunks
from ..briefs import Brief, scan_briefs
from ..ledger import TaskTracker
from ..settings import utc_now
from .assets import BATCH_TAG, BRIEF_PARTITIONS, NOT_SUBMITTED_TAG, generation_task, reference_uploads, video_brief
from .resources import BriefsResource, LedgerResource
from .sensors import run_ended_at

PARTITION_BATCH = 1000  # SQLite refuses statements with tens of thousands of variables
# On every run that submits a brief: which version of it ("<brief id>:<content hash, 16 hex>") the run is for.
VERSION_TAG = "rivya/brief_version"
# Runs launched before VERSION_TAG existed carry the version as their run key.
RUN_KEY_TAG = "dagster/run_key"
# On a relaunched version's runs: which relaunch (1, 2, 3) made them; Dagster's run retries copy it.
RELAUNCH_TAG = "rivya/relaunch"
MAX_RELAUNCHES = 3
# Failed runs older than this are not looked at again: by then a version has had its relaunches.
RELAUNCH_LOOKBACK = timedelta(hours=24)
CEILING_WARNING_SHARE = 0.8


def brief_version(brief: Brief) -> str:
    return f"{brief.id}:{brief.content_hash[:16]}"


def add_brief_partitions(instance: DagsterInstance, brief_ids: list[str]) -> tuple[int, int]:
    """Add a partition for each brief that has none (new, retired and back, or deleted in the UI), in batches
    (idempotent: a repeated call adds nothing); how many were added, and how many partitions there are now."""
    existing = set(instance.get_dynamic_partitions(BRIEF_PARTITIONS))
    new_keys = [brief_id for brief_id in brief_ids if brief_id not in existing]
    for chunk in chunks(new_keys, PARTITION_BATCH):
        instance.add_dynamic_partitions(BRIEF_PARTITIONS, chunk)
    return len(new_keys), len(existing) + len(new_keys)


def ceiling_warning(partitions: int, ceiling: int) -> str | None:
    """What discovery says once the partitions reach CEILING_WARNING_SHARE of the ceiling."""
    if partitions < CEILING_WARNING_SHARE * ceiling:
        return None
    return (
        f"{partitions} briefs partitions, {partitions / ceiling:.0%} of RIVYA_PARTITION_CEILING={ceiling} (Dagster "
        "advises at most 100,000 per asset: past it the UI's partition views slow down). Retire the partitions of "
        "briefs gone from the folder (`rivya-pipeline retire`), or start new campaigns in a deployment of their own."
    )


# instance -> the versions this process has seen launched: a run Dagster submitted stays submitted, so a code
# server's later ticks ask the run storage about the versions it has not seen launched yet only (a tick with
# nothing new asks nothing). A run deleted by a person stays counted until the code server restarts.
_seen_launched: dict[str, set[str]] = {}
SUBMITTED = [status for status in DagsterRunStatus if status != DagsterRunStatus.NOT_STARTED]


def launched_versions(instance: DagsterInstance, versions: Collection[str]) -> set[str]:
    """Which of `versions` have a run Dagster has submitted, whatever became of it.

    A run created but never submitted (NOT_STARTED: the daemon died in between) does not count: the tick that made
    it is evaluated again and Dagster submits that very run; counting it would leave it waiting forever."""
    try:
        memory = repr(instance.get_ref())
    except DagsterInvariantViolationError:  # an ephemeral instance (no ref): nothing to remember it by
        memory = None
    seen = _seen_launched.setdefault(memory, set()) if memory else set()
    unknown = sorted(set(versions) - seen)
    for chunk in chunks(unknown, PARTITION_BATCH):
        for tag in (VERSION_TAG, RUN_KEY_TAG):
            for run in instance.get_runs(RunsFilter(tags={tag: list(chunk)}, statuses=SUBMITTED)):
                seen.add(run.tags[tag])
    return seen & set(versions)


@dataclass(frozen=True)
class Relaunch:
    brief: Brief
    number: int  # 1 for the first relaunch of the version

    @property
    def run_key(self) -> str:
        return f"{brief_version(self.brief)}:relaunch{self.number}"


def relaunches(
    instance: DagsterInstance, tasks: TaskTracker, found: list[Brief], now: datetime, first_wait: timedelta
) -> list[Relaunch]:
    """The found brief versions to launch again: every run of the version failed (none queued, going, succeeded or
    canceled by a person), none of them refused on purpose, the ledger holds no create since the version's first
    run, fewer than MAX_RELAUNCHES were made, and the last failure is `first_wait` (doubling per relaunch) old.

    Reads the failed runs of the lookback window, then the runs of their versions only: a tick's cost follows the
    recent failures, not the folder's history."""
    current = {brief_version(brief): brief for brief in found}
    failed = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE], created_after=now - RELAUNCH_LOOKBACK))
    candidates = sorted({v for run in failed if (v := run.tags.get(VERSION_TAG)) in current})
    if not candidates:
        return []
    by_version: dict[str, list[RunRecord]] = {}
    for record in instance.get_run_records(RunsFilter(tags={VERSION_TAG: candidates})):
        by_version.setdefault(record.dagster_run.tags[VERSION_TAG], []).append(record)
    due = []
    for version, records in by_version.items():
        runs = [record.dagster_run for record in records]
        if any(run.status != DagsterRunStatus.FAILURE or NOT_SUBMITTED_TAG in run.tags for run in runs):
            continue
        made = max(int(run.tags.get(RELAUNCH_TAG, "0")) for run in runs)
        last_failure = max(map(run_ended_at, records))
        if made >= MAX_RELAUNCHES or now.timestamp() - last_failure < (first_wait * 2**made).total_seconds():
            continue
        brief = current[version]
        created = tasks.latest_for_brief(brief.id)
        first_run = min(record.create_timestamp for record in records)
        if created is not None and created.submitted_at >= first_run:
            continue  # a create was sent: the ledger's re-send and store queue own it now
        due.append(Relaunch(brief, made + 1))
    return due


def build_discovery_schedule(cron: str) -> ScheduleDefinition:
    @schedule(
        name="brief_discovery",
        cron_schedule=cron,
        target=AssetSelection.assets(video_brief, reference_uploads, generation_task),
        default_status=DefaultScheduleStatus.RUNNING,
        description="Scans the briefs folder; adds a partition per new brief and launches a run for every brief "
        "version that has no run yet (run key and tag = brief id + content hash, so one version is never launched "
        "twice). Evaluating it launches nothing by itself: a test evaluation hides no brief from later ticks. "
        "A version whose runs all failed before its create was sent is launched again, up to 3 times, spaced out.",
    )
    def brief_discovery(
        context: ScheduleEvaluationContext, briefs: BriefsResource, ledger: LedgerResource
    ) -> list[RunRequest] | SkipReason:
        found, errors = scan_briefs(briefs.folder())
        for error in errors:
            context.log.warning(f"skipped invalid brief: {error}")
        # A hint for the runs (each reads its own brief's file), not a record of what was launched: writing it
        # before any run exists hides nothing from a later tick.
        ledger.for_instance(context.instance).index_brief_files(briefs.folder(), {b.id: b.source for b in found})
        launched = launched_versions(context.instance, [brief_version(b) for b in found])
        fresh = [b for b in found if brief_version(b) not in launched]
        again = relaunches(
            context.instance,
            ledger.for_instance(context.instance),
            [b for b in found if brief_version(b) in launched],
            utc_now(),
            timedelta(seconds=briefs.relaunch_first_seconds),
        )
        # Every brief of the folder has a partition, launched or not: a retired brief that is back gets its partition
        # (and its history) again, and its version, bought already, is not launched.
        added, partitions = add_brief_partitions(context.instance, [b.id for b in found])
        if warning := ceiling_warning(partitions, briefs.partition_ceiling):
            context.log.warning(warning)
        if not fresh and not again:
            restored = f"; {added} partition(s) added back" if added else ""
            return SkipReason(f"{len(found)} brief(s), none new or changed; {len(errors)} invalid{restored}")
        tick_time = context.scheduled_execution_time or utc_now()
        batch = f"discovery-{tick_time:%Y%m%dT%H%M%S}"
        requests = [
            RunRequest(
                run_key=brief_version(b),
                partition_key=b.id,
                tags={BATCH_TAG: batch, VERSION_TAG: brief_version(b)},
            )
            for b in fresh
        ]
        for relaunch in again:
            context.log.info(f"relaunching {relaunch.run_key}: every run of it failed before its create was sent")
        return requests + [
            RunRequest(
                run_key=relaunch.run_key,
                partition_key=relaunch.brief.id,
                tags={
                    BATCH_TAG: batch,
                    VERSION_TAG: brief_version(relaunch.brief),
                    RELAUNCH_TAG: str(relaunch.number),
                },
            )
            for relaunch in again
        ]

    return brief_discovery
