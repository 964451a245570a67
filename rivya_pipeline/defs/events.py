"""What the assets and the sensor record: materialization metadata, task observations and check results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dagster import AssetCheckResult, AssetCheckSeverity, AssetObservation, MetadataValue

from ..briefs import Brief
from ..delivery import Delivery
from ..polling import PollReport
from ..rivya import FileObject, GenerationRequest, GenerationTask, TaskStatus
from ..submission import Submitted
from .inputs import UPLOADS_METADATA, TaskHandle

DURATION_TOLERANCE_SECONDS = 0.5
# Name -> description of each check of stored_video (assets.py makes them its check specs).
STORED_VIDEO_CHECK_DESCRIPTIONS = {
    "decodable_mp4": "Every frame decodes.",
    "duration_matches": f"Within ±{DURATION_TOLERANCE_SECONDS} s of the brief.",
    "aspect_ratio_matches": "Frame matches the brief.",
    "sha256_matches": "S3 object = bytes received.",
}


def brief_metadata(brief: Brief) -> dict[str, Any]:
    return {
        "prompt": brief.prompt,
        "params": MetadataValue.json(brief.request.params),
        "model": brief.model,
        "references": len(brief.references),
        "price_credits": brief.request.price_credits,
        "source": MetadataValue.path(str(brief.source)),
    }


def uploads_metadata(uploads: Sequence[FileObject], request: GenerationRequest) -> dict[str, Any]:
    """A readable list of the uploaded references, and the file objects themselves for the next step."""
    listing = "\n".join(
        f"- `{f.id}` {ref.name} ({ref.mime_type}, {ref.size_bytes:,} bytes, sha256 `{ref.sha256[:16]}…`)"
        f" [{f.url}]({f.url})"
        for f, ref in zip(uploads, request.references, strict=True)
    )
    return {
        "files": MetadataValue.md(listing or "No reference images (text-to-video)."),
        UPLOADS_METADATA: MetadataValue.json([f.model_dump(mode="json", exclude_none=True) for f in uploads]),
        "count": len(uploads),
    }


def submitted_metadata(submitted: Submitted, request: GenerationRequest) -> dict[str, Any]:
    task, decision = submitted.task, submitted.decision
    return {
        "task_id": task.id,
        "status": task.status,
        "action": decision.action,
        "reserved_credits": task.reserved_credits,
        "final_credits": task.final_credits,
        "refunded_credits": task.refunded_credits,
        "prompt": request.prompt,
        "params": MetadataValue.json(request.params),
        "idempotency_key": decision.idempotency_key,
        "client_request_id": decision.body.get("client_request_id", ""),
    }


def generation_task_observation(brief_id: str, task: GenerationTask) -> AssetObservation:
    """A task's status and credits after its create (they change when it ends), on its generation_task partition."""
    metadata: dict[str, Any] = {
        "task_id": task.id,
        "status": task.status,
        "reserved_credits": task.reserved_credits,
        "final_credits": task.final_credits,
        "refunded_credits": task.refunded_credits,
    }
    if task.error:
        metadata |= {"error_code": task.error.code, "error_message": task.error.message}
    return AssetObservation("generation_task", partition=brief_id, metadata=metadata)


def poll_observations(report: PollReport) -> list[AssetObservation]:
    """Status changes, timeouts and lost tasks of one poll pass, recorded on the generation_task partition."""
    events = [generation_task_observation(record.brief_id, task) for record, task in report.changed]
    ended = [(r, TaskStatus.TIMED_OUT.value) for r in report.timed_out] + [(r, "not_found") for r in report.lost]
    for record, status in ended:
        events.append(
            AssetObservation(
                "generation_task",
                partition=record.brief_id,
                metadata={"task_id": record.task_id, "status": status, "reserved_credits": record.reserved_credits},
            )
        )
    return events


def sidecar_lineage(handle: TaskHandle, run_id: str) -> dict[str, Any]:
    """What the stored video's sidecar says about where it came from."""
    return {
        "brief_id": handle.brief_id,
        "model": handle.model,
        "prompt": handle.prompt,
        "params": handle.params,
        "idempotency_key": handle.idempotency_key,
        "dagster_run_id": run_id,
    }


def stored_video_metadata(delivery: Delivery, task: GenerationTask, handle: TaskHandle) -> dict[str, Any]:
    """The stored video's partition page says what the video shows (the prompt), not only where it is."""
    probe = delivery.probe
    return {
        "s3_uri": delivery.video.uri,
        "s3_link": MetadataValue.url(delivery.video.console_url),
        "sidecar": delivery.sidecar.uri,
        "task_id": task.id,
        "prompt": handle.prompt,
        "reserved_credits": task.reserved_credits,
        "final_credits": task.final_credits,
        "refunded_credits": task.refunded_credits,
        "bytes": delivery.video.size_bytes,
        "sha256": delivery.video.sha256,
        "duration_seconds": probe.duration_seconds if probe else None,
        "resolution": probe.resolution if probe else None,
        "codec": probe.codec if probe else None,
        "transfer_mb_per_s": round(delivery.mb_per_second, 1),
    }


def stored_video_checks(delivery: Delivery, handle: TaskHandle) -> list[AssetCheckResult]:
    probe = delivery.probe
    wanted_duration = float(handle.params.get("duration", 0))
    wanted_aspect = str(handle.params.get("aspect_ratio", ""))
    duration_ok = probe is not None and abs(probe.duration_seconds - wanted_duration) <= DURATION_TOLERANCE_SECONDS
    aspect_ok = probe is not None and bool(wanted_aspect) and probe.matches_aspect(wanted_aspect)
    return [
        AssetCheckResult(
            check_name="decodable_mp4",
            passed=probe is not None,
            metadata={"frames": probe.frames if probe else 0, "error": delivery.probe_error or ""},
        ),
        AssetCheckResult(
            check_name="duration_matches",
            passed=duration_ok,
            metadata={"wanted": wanted_duration, "actual": probe.duration_seconds if probe else -1.0},
        ),
        AssetCheckResult(
            check_name="aspect_ratio_matches",
            passed=aspect_ok,
            metadata={"wanted": wanted_aspect, "actual": probe.resolution if probe else ""},
        ),
        AssetCheckResult(
            check_name="sha256_matches",
            passed=delivery.stored_sha256 == delivery.video.sha256,
            severity=AssetCheckSeverity.ERROR,
            metadata={"received": delivery.video.sha256, "stored": delivery.stored_sha256},
        ),
    ]
