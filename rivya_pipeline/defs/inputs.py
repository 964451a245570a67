"""Where the assets' inputs come from: the briefs folder, the instance's event log and the ledger, which every
run process and step process can read.

Step outputs would otherwise be pickled on the disk of whichever machine ran the upstream step. Store runs
(launched by the sensor) and re-send runs are separate runs, and with a pod per step or Celery workers even the
steps of one run are on different machines (deploy/): no input may depend on where the step before it ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from dagster import AssetRecordsFilter, Failure, InputContext, input_manager

from ..briefs import Brief
from ..ledger import TaskRecord
from ..rivya import FileObject

TASK_TAG = "rivya/task_id"  # on a store run: the task whose video it stores
BRIEF_LOADER = "brief_loader"
UPLOADS_LOADER = "uploads_loader"
TASK_LOADER = "task_loader"
UPLOADS_METADATA = "uploads"  # reference_uploads' metadata entry holding the file objects


@dataclass(frozen=True)
class TaskHandle:
    """What downstream needs to find a task again: its id, key and what was asked."""

    brief_id: str
    task_id: str
    idempotency_key: str
    model: str
    prompt: str
    params: dict[str, Any]  # as sent, without the reference images' URLs
    price_credits: int
    submitted_at: datetime
    deadline_at: datetime


@input_manager(required_resource_keys={"briefs", "ledger"})
def brief_from_folder(context: InputContext) -> Brief:
    """The partition's brief, validated again from its file (cheap, offline: the ledger's index names the file)."""
    index = context.resources.ledger.for_instance(context.instance)
    return context.resources.briefs.load(context.asset_partition_key, index)


@input_manager
def uploads_from_event_log(context: InputContext) -> list[FileObject]:
    """The file objects of the partition's latest reference_uploads materialization, from its metadata."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[context.asset_partition_key]), limit=1
    ).records
    if not records:
        raise Failure(
            f"No reference uploads for brief {context.asset_partition_key!r}: materialize reference_uploads first.",
            allow_retries=False,
        )
    materialization = records[0].asset_materialization
    assert materialization is not None  # a materialization's record holds it
    uploads = cast(list[dict[str, Any]], materialization.metadata[UPLOADS_METADATA].value)  # JSON, see events.py
    return [FileObject.model_validate(upload) for upload in uploads]


@input_manager(required_resource_keys={"ledger"})
def task_from_ledger(context: InputContext) -> TaskHandle:
    """The task named by the run's `rivya/task_id` tag, or else the partition's latest submitted task."""
    ledger = context.resources.ledger.for_instance(context.instance)
    brief_id = context.asset_partition_key
    task_id = context.step_context.run_tags.get(TASK_TAG)
    return task_handle(ledger.find_by_task(task_id) if task_id else ledger.latest_for_brief(brief_id), brief_id)


def task_handle(record: TaskRecord | None, brief_id: str) -> TaskHandle:
    """The handle of a submitted task's ledger record; a Failure when the brief has no submitted task."""
    if record is None or record.task_id is None or record.deadline_at is None:
        raise Failure(
            f"The ledger holds no submitted task for brief {brief_id!r}: materialize generation_task first.",
            allow_retries=False,
        )
    params = {k: v for k, v in record.body["params"].items() if k != "referenceMediaItems"}
    return TaskHandle(
        brief_id=record.brief_id,
        task_id=record.task_id,
        idempotency_key=record.idempotency_key,
        model=record.model,
        prompt=record.body["prompt"],
        params=params,
        price_credits=record.price_credits,
        submitted_at=record.submitted_at,
        deadline_at=record.deadline_at,
    )
