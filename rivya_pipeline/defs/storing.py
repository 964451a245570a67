"""Storing one succeeded task's video and what Dagster records of it.

Shared by the `stored_video` asset (one partition per run: the UI, retries) and the `store_videos` job (a batch of
partitions per run, which the sensor launches so that storing costs a fraction of a run per brief).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from dagster import AssetCheckResult, AssetObservation, Failure

from ..delivery import deliver_video
from ..ledger import TaskTracker
from ..polling import TaskDeadlineExceeded, wait_for_terminal
from ..rivya import TaskStatus
from ..rivya.media import MediaFetchError
from ..submission import record_news
from . import events
from .inputs import TaskHandle
from .resources import RivyaResource, VideoQcResource, VideoStorageResource
from .video_qc import picture_metadata, qc_check_results


@dataclass(frozen=True)
class StoredVideo:
    """A video stored and verified: its partition's materialization metadata and check results."""

    metadata: dict[str, Any]
    checks: list[AssetCheckResult]


def store_video(
    handle: TaskHandle,
    *,
    run_id: str,
    tasks: TaskTracker,
    rivya: RivyaResource,
    video_storage: VideoStorageResource,
    video_qc: VideoQcResource,
) -> Iterator[AssetObservation | StoredVideo]:
    """Wait for the task's end, stream its video to S3 and verify it; a `Failure` says whether a retry can help.

    An observation of the task's end comes first when this store saw it before the sensor did: yielded, not
    logged, so it is kept even if the store then fails."""
    try:
        task = wait_for_terminal(
            rivya.client(), handle.task_id, submitted_at=handle.submitted_at, deadline_at=handle.deadline_at
        )
    except TaskDeadlineExceeded as exc:
        raise Failure(str(exc), allow_retries=False) from None
    if record_news(tasks, task):
        yield events.generation_task_observation(handle.brief_id, task)
    if task.status == TaskStatus.FAILED:
        error = task.error.code if task.error else "generation_failed"
        raise Failure(
            f"Task {task.id} failed ({error}); {task.refunded_credits} credits refunded. Nothing stored.",
            allow_retries=False,
        )
    with rivya.media_fetcher() as fetcher, refused_media_reported(task.id):
        delivery = deliver_video(
            task=task,
            brief_id=handle.brief_id,
            fetcher=fetcher,
            store=video_storage.store(),
            lineage=events.sidecar_lineage(handle, run_id),
            qc_thresholds=video_qc.thresholds(),
        )
    tasks.mark_stored(task.id, uri=delivery.video.uri, sha256=delivery.video.sha256)
    yield StoredVideo(
        metadata={**events.stored_video_metadata(delivery, task, handle), **picture_metadata(delivery)},
        checks=[
            *events.stored_video_checks(delivery, handle),
            *qc_check_results(delivery, handle, video_qc.thresholds()),
        ],
    )


@contextmanager
def refused_media_reported(task_id: str) -> Iterator[None]:
    """A result URL the rules refuse is a Failure that says so; only a transient fetch error may be retried."""
    try:
        yield
    except MediaFetchError as exc:
        transient = exc.reason in ("http_status", "transport")
        raise Failure(f"Result video of task {task_id} not stored: {exc}", allow_retries=transient) from None
