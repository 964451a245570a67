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
from ..ledger import TaskRecord, TaskTracker
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


STORE_FAILED = "store_failed"  # metadata key of the observation that records a failed store on its partition
# A result URL the fetcher refuses stays refused however often it is asked: no retry can change these.
REFUSED_MEDIA = frozenset({"invalid_url", "scheme", "private_address", "redirect", "too_large"})


class ResultRefused(Failure):
    """The task's result URL breaks the fetcher's rules (scheme, address, redirect, size): never retried."""


def store_video(
    handle: TaskHandle,
    *,
    run_id: str,
    tasks: TaskTracker,
    rivya: RivyaResource,
    video_storage: VideoStorageResource,
    video_qc: VideoQcResource,
) -> Iterator[AssetObservation | StoredVideo]:
    """Wait for the task's end, stream its video to S3 and verify it; a `Failure` says what happens next.

    An observation of the task's end comes first when this store saw it before the sensor did: yielded, not
    logged, so it is kept even if the store then fails. Every failure of a succeeded task's store is recorded
    (`failure_recorded`): storing is free, so nothing here gives up early. The caller must record the
    `StoredVideo` before it asks for the next event: the ledger marks the video stored only then."""
    try:
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
        yield StoredVideo(
            metadata={**events.stored_video_metadata(delivery, task, handle), **picture_metadata(delivery)},
            checks=[
                *events.stored_video_checks(delivery, handle),
                *qc_check_results(delivery, handle, video_qc.thresholds()),
            ],
        )
        # Only once the partition's materialization is written (Dagster writes an event as it is yielded): the
        # ledger's mark takes the video out of the store queue, so a kill between the two must leave it queued.
        tasks.mark_stored(task.id, uri=delivery.video.uri, sha256=delivery.video.sha256)
    except Exception as exc:
        observation, failure = failure_recorded(exc, handle, tasks, video_storage)
        if observation is None or failure is None:
            raise
        yield observation
        raise failure from None


def failure_recorded(
    exc: Exception, handle: TaskHandle, tasks: TaskTracker, video_storage: VideoStorageResource
) -> tuple[AssetObservation, Failure] | tuple[None, None]:
    """The ledger counts a failed store and says when the video is due again (or that its store window ran out);
    the partition gets an observation saying so, and the `Failure` repeats it. Whatever failed (the media host, S3,
    Rivya's answer to the re-read of the task, a killed connection), the sensor tries again after the backoff.
    (None, None): no video to store (no such task, or it failed or is still running)."""
    reason = exc.description if isinstance(exc, Failure) and exc.description else f"{type(exc).__name__}: {exc}"
    record = tasks.record_store_failure(
        handle.task_id, error=reason, retry=video_storage.retry_policy(), give_up=isinstance(exc, ResultRefused)
    )
    if record is None or record.status != TaskStatus.SUCCEEDED:
        return None, None
    next_step = store_outlook(record)
    observation = AssetObservation(
        "stored_video",
        partition=handle.brief_id,
        metadata={STORE_FAILED: reason, "task_id": handle.task_id, "next": next_step},
    )
    return observation, Failure(f"{reason}. {next_step}", allow_retries=False)


def store_outlook(record: TaskRecord) -> str:
    """What happens next to a video a store did not store, in words a person acts on."""
    if record.stored_at is not None:
        return f"Stored meanwhile at {record.stored_uri}."
    if record.store_due_at is not None:
        return (
            f"Attempt {record.store_attempts} failed; the sensor (or the next `rivya-pipeline run`) tries again from "
            f"{record.store_due_at:%Y-%m-%d %H:%M:%S}Z (its waits double after each failure)."
        )
    return (
        f"Given up after {record.store_attempts} attempt(s): the store window ran out or the result was refused. "
        "Fix the cause, then materialize stored_video for this partition (it reads the task again for a fresh "
        "result URL; nothing is bought again)."
    )


@contextmanager
def refused_media_reported(task_id: str) -> Iterator[None]:
    """A result URL the rules refuse is a `ResultRefused`; any other fetch error is a Failure a later try may heal."""
    try:
        yield
    except MediaFetchError as exc:
        message = f"Result video of task {task_id} not stored: {exc}"
        if exc.reason in REFUSED_MEDIA:
            raise ResultRefused(message, allow_retries=False) from None
        raise Failure(message, allow_retries=True) from None
