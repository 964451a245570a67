"""`rivya-pipeline retire`: the partition lifecycle's last step, so a year of briefs stays under Dagster's ceiling.

A brief's partition is retired (its key removed from the `briefs` dynamic partitions) once the brief has left the
folder, its newest video was stored at least the retention period ago, and nothing of it still waits: no ledger
task pending or due to be stored, no run of its partition going. Retiring deletes nothing else: the videos and
their S3 sidecars (the lineage record), the ledger rows and Dagster's runs and events all stay. A retired brief that
comes back into the folder gets its partition again at discovery's next tick, with its history; its version is
never bought again (its runs are on record and its ledger row is stored), only a changed version is.

A command, not a setting of discovery: evaluating the schedule must have no lasting effect (the UI's "Test
Schedule"), and deleting is a step a team chooses the timing of (cron, or by hand after `--dry-run`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from dagster import DagsterInstance, RunsFilter

from .batching import chunks
from .briefs import scan_briefs
from .defs.assets import BRIEF_PARTITIONS
from .defs.schedules import PARTITION_BATCH
from .defs.sensors import PARTITION_TAG, UNFINISHED
from .ledger import Ledger, TaskRecord
from .rivya import PENDING_STATUSES, TaskStatus

# Why a partition of a brief that left the folder is kept, as `retire` prints it.
KEPT_NOT_STORED = "never stored (not bought, failed, or given up: the UI keeps showing it)"
KEPT_RECENT = "stored within the retention period"
KEPT_WAITING = "a task of it still waits (an unanswered create, Rivya still working, a video due to be stored)"
KEPT_RUN_GOING = "a run of its partition is going"
KEPT_FILE_UNREADABLE = "its last file is in the folder but cannot be read: it may still hold the brief"
# A task in one of these may still cost or deliver something.
WAITING_STATUSES = PENDING_STATUSES | {TaskStatus.SUBMITTING}


@dataclass(frozen=True)
class Retirement:
    brief_id: str
    stored_at: datetime
    stored_uri: str
    task_id: str | None


@dataclass
class RetirementPlan:
    """The partitions to retire, and how many others were looked at and kept, by reason."""

    retire: list[Retirement] = field(default_factory=list)
    kept: dict[str, int] = field(default_factory=dict)
    in_folder: int = 0

    def keep(self, reason: str, count: int) -> None:
        if count:
            self.kept[reason] = self.kept.get(reason, 0) + count


def plan_retirement(
    instance: DagsterInstance, ledger: Ledger, folder: Path, *, stored_before: datetime
) -> RetirementPlan:
    """What `retire_partitions` would do now; reads only, changes nothing."""
    found, errors = scan_briefs(folder)
    present = {brief.id for brief in found} | {e.brief_id for e in errors if e.brief_id is not None}
    partitions = instance.get_dynamic_partitions(BRIEF_PARTITIONS)
    gone = [key for key in partitions if key not in present]
    plan = RetirementPlan(in_folder=len(partitions) - len(gone))
    by_brief = ledger.tasks_of_briefs(gone)
    plan.keep(KEPT_NOT_STORED, len(gone) - len(by_brief))  # never submitted
    settled: dict[str, TaskRecord] = {}
    for brief_id, records in by_brief.items():
        newest = max(records, key=lambda r: (r.submitted_at, r.idempotency_key))
        if any(r.status in WAITING_STATUSES or r.store_due_at is not None for r in records):
            plan.keep(KEPT_WAITING, 1)
        elif newest.stored_at is None:
            plan.keep(KEPT_NOT_STORED, 1)
        elif newest.stored_at >= stored_before:
            plan.keep(KEPT_RECENT, 1)
        else:
            settled[brief_id] = newest
    candidates = sorted(settled)
    going = {
        run.tags[PARTITION_TAG]
        for chunk in chunks(candidates, PARTITION_BATCH)
        for run in instance.get_runs(RunsFilter(tags={PARTITION_TAG: list(chunk)}, statuses=UNFINISHED))
    }
    plan.keep(KEPT_RUN_GOING, len(going))
    # A file that cannot be read hides the ids it holds: a brief last seen in such a file may still be there.
    unreadable = {e.file.resolve() for e in errors if e.brief_id is None}
    for brief_id in candidates:
        if brief_id in going:
            continue
        last_file = ledger.brief_file(folder, brief_id) if unreadable else None
        if last_file is not None and last_file.resolve() in unreadable:
            plan.keep(KEPT_FILE_UNREADABLE, 1)
            continue
        record = settled[brief_id]
        assert record.stored_at is not None and record.stored_uri is not None  # stored, as sorted above
        plan.retire.append(Retirement(brief_id, record.stored_at, record.stored_uri, record.task_id))
    return plan


def retire_partitions(instance: DagsterInstance, plan: RetirementPlan) -> int:
    """Remove the planned partitions' keys from `briefs`; how many. Nothing else is deleted (see the module)."""
    for retirement in plan.retire:
        instance.delete_dynamic_partition(BRIEF_PARTITIONS, retirement.brief_id)
    return len(plan.retire)
