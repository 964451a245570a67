"""`store_videos`: one run that stores the videos of many succeeded tasks, each recorded on its own partition.

A run costs far more than the store itself (a process or a worker slot, some thirty events, run bookkeeping), so
the sensor sends the stores of a tick in batches. Each video still gets its own `stored_video` materialization,
metadata and check evaluations on its brief's partition, exactly as a `stored_video` run records them. One video's
failure never stops the others: it is recorded on its partition and in the store queue (storing.py), the run fails
at the end naming it, and the sensor retries that video alone in a `stored_video` run once its backoff has passed.
Paid submits are never batched (generation_task runs stay one brief each), so nothing here can block or re-buy
another brief's video.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetMaterialization,
    AssetObservation,
    AssetRecordsFilter,
    Config,
    DagsterInstance,
    Failure,
    OpExecutionContext,
    job,
    op,
)

# Dagster 1.13 takes this in the public AssetCheckEvaluation but does not export it. Without it a check evaluated
# outside its asset's step does not count as a check of the latest materialization (AssetCheckPartitionInfo).
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from pydantic import Field

from ..batching import chunks
from ..ledger import TaskRecord, TaskTracker
from .assets import STORED_VIDEO_CHECKS, stored_video
from .inputs import task_handle
from .resources import LedgerResource, RivyaResource, VideoQcResource, VideoStorageResource
from .storing import StoredVideo, store_video

STORE_VIDEOS_JOB = "store_videos"
STORE_OP = "store_each_video"
BLOCKING_CHECKS = {spec.name for spec in STORED_VIDEO_CHECKS if spec.blocking}
# Videos per store_videos run: a tick's stores spread over a few runs, so workers store them side by side.
STORE_BATCH_SIZE = 10


class StoreVideosConfig(Config):
    task_ids: list[str] = Field(description="Rivya task ids whose succeeded videos this run stores, in this order.")


def store_videos_run_config(task_ids: list[str]) -> dict[str, Any]:
    return {"ops": {STORE_OP: {"config": {"task_ids": task_ids}}}}


def in_batches(records: Sequence[TaskRecord]) -> list[Sequence[TaskRecord]]:
    """`records` in order, STORE_BATCH_SIZE at a time: what one store_videos run stores."""
    return list(chunks(records, STORE_BATCH_SIZE))


def batched_task_ids(run_config: Mapping[str, Any]) -> list[str]:
    """The task ids a store_videos run was asked to store, from its run config."""
    return list(run_config.get("ops", {}).get(STORE_OP, {}).get("config", {}).get("task_ids", []))


@op(
    name=STORE_OP,
    out={},
    description="Stores each task's video on its brief's stored_video partition; see store_batch.py.",
)
def store_each_video(
    context: OpExecutionContext,
    config: StoreVideosConfig,
    rivya: RivyaResource,
    ledger: LedgerResource,
    video_storage: VideoStorageResource,
    video_qc: VideoQcResource,
) -> Iterator[AssetMaterialization | AssetObservation | AssetCheckEvaluation]:
    tasks = ledger.for_instance(context.instance)
    failed: dict[str, str] = {}
    for task_id in config.task_ids:
        record = tasks.find_by_task(task_id)
        brief_id = record.brief_id if record else f"(task {task_id})"
        try:
            yield from _store_one(context, record, brief_id, tasks, rivya, video_storage, video_qc)
        except Exception as exc:  # one video's failure, whatever it is, never stops the others
            reason = exc.description if isinstance(exc, Failure) and exc.description else f"{type(exc).__name__}: {exc}"
            failed[brief_id] = reason
            context.log.error(f"brief {brief_id}: video of task {task_id} not stored: {reason}")
    if failed:
        raise Failure(
            f"{len(failed)} of {len(config.task_ids)} videos not stored; each is retried alone when due: "
            + "; ".join(f"{brief}: {reason}" for brief, reason in failed.items()),
            allow_retries=False,
        )


def _store_one(
    context: OpExecutionContext,
    record: TaskRecord | None,
    brief_id: str,
    tasks: TaskTracker,
    rivya: RivyaResource,
    video_storage: VideoStorageResource,
    video_qc: VideoQcResource,
) -> Iterator[AssetMaterialization | AssetObservation | AssetCheckEvaluation]:
    handle = task_handle(record, brief_id)
    if record is not None and record.stored_uri:
        context.log.info(f"brief {brief_id}: already stored at {record.stored_uri}")
        return
    for event in store_video(
        handle, run_id=context.run_id, tasks=tasks, rivya=rivya, video_storage=video_storage, video_qc=video_qc
    ):
        if not isinstance(event, StoredVideo):
            yield event
            continue
        yield AssetMaterialization(asset_key=stored_video.key, partition=brief_id, metadata=event.metadata)
        target = _latest_materialization(context.instance, brief_id)
        for result in event.checks:
            yield AssetCheckEvaluation(
                asset_key=stored_video.key,
                check_name=result.check_name or "",
                passed=result.passed,
                metadata=result.metadata,
                severity=result.severity,
                description=result.description,
                blocking=result.check_name in BLOCKING_CHECKS,
                partition=brief_id,
                target_materialization_data=target,
            )


def _latest_materialization(
    instance: DagsterInstance, brief_id: str
) -> AssetCheckEvaluationTargetMaterializationData | None:
    """The partition's materialization just recorded (Dagster writes an op's event as it is yielded)."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=stored_video.key, asset_partitions=[brief_id]), limit=1
    ).records
    if not records:
        return None
    return AssetCheckEvaluationTargetMaterializationData(
        run_id=records[0].run_id, storage_id=records[0].storage_id, timestamp=records[0].timestamp
    )


@job(
    name=STORE_VIDEOS_JOB,
    description="Stores the videos of many succeeded tasks in one run, each on its own stored_video partition "
    "(launched by pending_generation_tasks; a video that fails is retried alone in a stored_video run).",
)
def store_videos() -> None:
    store_each_video()
