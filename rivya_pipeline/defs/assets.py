"""The asset graph, one partition per brief: video_brief -> reference_uploads -> generation_task -> stored_video.

Each asset is thin: the work lives in the client, the ledger, the poller and the delivery module.
"""


import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetObservation,
    DataVersion,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    PreviewWarning,
    asset,
)

from ..briefs import Brief
from ..delivery import deliver_video
from ..ledger import BudgetExceeded, StaleSubmission
from ..polling import FIRST_POLL_SECONDS, TaskDeadlineExceeded, wait_for_terminal
from ..rivya import FileObject, NotFound, RivyaError
from ..rivya.media import MediaFetchError
from .inputs import BRIEF_LOADER, TASK_LOADER, UPLOADS_LOADER, UPLOADS_METADATA, TaskHandle
from .resources import PAID_CREATE_POOL, BriefsResource, CreditLimitsResource, RivyaResource, VideoStorageResource

briefs_partitions = DynamicPartitionsDefinition(name="briefs")
GROUP = "video_generation"
BATCH_TAG = "rivya/batch"
RESEND_TAG = "rivya/resend"  # on a run the sensor launched to re-send one unanswered create: its Idempotency-Key
DURATION_TOLERANCE_SECONDS = 0.5


@asset(
    partitions_def=briefs_partitions,
    group_name=GROUP,
    kinds={"yaml"},
    description="One YAML brief, validated offline (prompt, params, reference images). Its data version is the "
    "hash of what it asks for, so editing a brief marks everything downstream stale.",
)
def video_brief(context: AssetExecutionContext, briefs: BriefsResource) -> MaterializeResult:
    brief = briefs.load(context.partition_key)
    return MaterializeResult(
        data_version=DataVersion(brief.content_hash),
        metadata={
            "prompt": brief.prompt,
            "params": MetadataValue.json(brief.request.params),
            "model": brief.model,
            "references": len(brief.references),
            "price_credits": brief.request.price_credits,
            "source": MetadataValue.path(str(brief.source)),
        },
    )


@asset(
    partitions_def=briefs_partitions,
    group_name=GROUP,
    kinds={"rivya"},
    ins={"video_brief": AssetIn(input_manager_key=BRIEF_LOADER)},
    description="The brief's reference images, uploaded through Rivya's Files API (free; no credits).",
)
def reference_uploads(
    context: AssetExecutionContext, video_brief: Brief, rivya: RivyaResource
) -> MaterializeResult:
    client = rivya.client()
    uploads = [
        client.upload_file(
            ref.path,
            kind="image",
            mime_type=ref.mime_type,
            model=video_brief.model,
            client_request_id=f"{video_brief.id}-ref{i}-{ref.sha256[:12]}",
        )
        for i, ref in enumerate(video_brief.request.references)
    ]
    return MaterializeResult(
        metadata={
            "files": MetadataValue.md(
                "\n".join(
                    f"- `{f.id}` {ref.name} ({ref.mime_type}, {ref.size_bytes:,} bytes, sha256 `{ref.sha256[:16]}…`)"
                    f" [{f.url}]({f.url})"
                    for f, ref in zip(uploads, video_brief.request.references, strict=True)
                )
                or "No reference images (text-to-video)."
            ),
            UPLOADS_METADATA: MetadataValue.json([f.model_dump(mode="json", exclude_none=True) for f in uploads]),
            "count": len(uploads),
        },
    )


@asset(
    partitions_def=briefs_partitions,
    group_name=GROUP,
    kinds={"rivya"},
    pool=PAID_CREATE_POOL,
    ins={
        "video_brief": AssetIn(input_manager_key=BRIEF_LOADER),
        "reference_uploads": AssetIn(input_manager_key=UPLOADS_LOADER),
    },
    description="The paid generation task (90 credits for kling-3-0). Submitted once per brief version with a "
    "deterministic Idempotency-Key, after the credit limits are checked; re-runs re-attach instead of paying again. "
    "Finishes at once: the `pending_generation_tasks` sensor polls it.",
)
def generation_task(
    context: AssetExecutionContext,
    video_brief: Brief,
    reference_uploads: list[FileObject],
    rivya: RivyaResource,
    credit_limits: CreditLimitsResource,
) -> MaterializeResult:
    request = video_brief.request
    key = request.idempotency_key()
    resending = context.run.tags.get(RESEND_TAG)
    if resending and resending != key:
        raise Failure(
            f"This run was to re-send the unanswered create {resending}, but brief {video_brief.id!r} now asks for "
            "something else: nothing sent. The brief's own runs submit its new version.",
            allow_retries=False,
        )
    ledger = credit_limits.ledger(context.instance)
    client = rivya.client()
    try:
        decision = ledger.begin_submit(
            idempotency_key=key,
            brief_id=video_brief.id,
            run_id=context.run.tags.get(BATCH_TAG, context.run_id),
            model=request.model,
            price_credits=request.price_credits,
            body=request.api_body(reference_uploads, client_request_id=context.run_id),
            limits=credit_limits.limits(),
            wallet_credits=client.get_credits,
        )
    except (BudgetExceeded, StaleSubmission) as exc:
        raise Failure(f"Not submitted: {exc}", allow_retries=False) from None
    task = submit_or_reattach(client, ledger, decision, credit_limits.task_deadline_minutes)
    if task.status == "failed":
        raise Failure(
            f"Task {task.id} for brief {video_brief.id!r} failed ({task.error.code if task.error else '?'}; "
            f"{task.refunded_credits} credits refunded). It is not resubmitted silently: bump `regenerate` in the "
            "brief to pay for a new one.",
            allow_retries=False,
        )
    return MaterializeResult(
        metadata={
            "task_id": task.id,
            "status": task.status,
            "action": decision.action,
            "reserved_credits": task.reserved_credits,
            "final_credits": task.final_credits,
            "refunded_credits": task.refunded_credits,
            "prompt": request.prompt,
            "params": MetadataValue.json(request.params),
            "idempotency_key": key,
            "client_request_id": decision.body.get("client_request_id", ""),
        },
    )


def submit_or_reattach(client, ledger, decision, deadline_minutes: int):
    """Create the task (or re-send the stored request) and record it; a known task is only looked up."""
    if decision.action == "reattach":
        try:
            return client.get_generation(decision.task_id)
        except NotFound:
            raise Failure(
                f"The ledger holds task {decision.task_id} for this request but the API does not know it "
                "(another account or base URL?). Not resubmitting: bump `regenerate` to pay for a new task.",
                allow_retries=False,
            ) from None
    try:
        task = client.create_generation(decision.body, idempotency_key=decision.idempotency_key)
    except RivyaError as exc:
        if not exc.retryable:
            ledger.release(decision.idempotency_key)
            raise Failure(f"Rivya refused the task: {exc}", allow_retries=False) from None
        raise Failure(
            f"Outcome of the create is unknown ({exc}); a re-run re-sends the same request with the same "
            "Idempotency-Key, so it cannot pay twice.",
            allow_retries=True,
        ) from None
    now = datetime.now(UTC)
    ledger.record_task(
        decision.idempotency_key,
        task_id=task.id,
        status=task.status,
        reserved_credits=task.reserved_credits,
        final_credits=task.final_credits,
        deadline_at=now + timedelta(minutes=deadline_minutes),
        next_poll_at=now + timedelta(seconds=FIRST_POLL_SECONDS),
    )
    if task.is_terminal:
        # A create replayed after a lost answer can return a task that has already ended, and nothing polls a
        # terminal task: record its outcome here, or a failure would be reported without its code and refund.
        record_terminal(ledger, task)
    return task


def record_terminal(ledger, task) -> None:
    """A terminal status seen outside the sensor's polls: the ledger stops polling the task and has its credits."""
    ledger.update_status(
        task.id,
        status=task.status,
        final_credits=task.final_credits,
        refunded_credits=task.refunded_credits,
        error_code=task.error.code if task.error else None,
        error_message=task.error.message if task.error else None,
        polled_at=datetime.now(UTC),
    )


def generation_task_observation(brief_id: str, task) -> AssetObservation:
    """A task's status and credits after its create (they change when it ends), on its generation_task partition."""
    metadata = {
        "task_id": task.id,
        "status": task.status,
        "reserved_credits": task.reserved_credits,
        "final_credits": task.final_credits,
        "refunded_credits": task.refunded_credits,
    }
    if task.error:
        metadata |= {"error_code": task.error.code, "error_message": task.error.message}
    return AssetObservation("generation_task", partition=brief_id, metadata=metadata)


# Partitioned like the asset: each brief's video has its own check results. Without partitions_def Dagster
# records them as checks of the whole asset, and a later brief's pass hides an earlier brief's failure.
# Dagster 1.13 calls partitioned checks a preview and warns on every load; the warning is silenced here only.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", PreviewWarning)
    STORED_VIDEO_CHECKS = [
        AssetCheckSpec(name, asset="stored_video", blocking=True, partitions_def=briefs_partitions, description=text)
        for name, text in [
            ("decodable_mp4", "Every frame decodes."),
            ("duration_matches", "Within ±0.5 s of the brief."),
            ("aspect_ratio_matches", "Frame matches the brief."),
            ("sha256_matches", "S3 object = bytes received."),
        ]
    ]


@asset(
    partitions_def=briefs_partitions,
    group_name=GROUP,
    kinds={"s3"},
    check_specs=STORED_VIDEO_CHECKS,
    ins={"generation_task": AssetIn(input_manager_key=TASK_LOADER)},
    description="The finished video in S3 ({prefix}/{brief}/{task}.mp4) with a JSON lineage sidecar, streamed from "
    "Rivya's media host and verified: decodable, right duration and aspect ratio, SHA-256 of the stored object.",
)
def stored_video(
    context: AssetExecutionContext,
    generation_task: TaskHandle,
    rivya: RivyaResource,
    credit_limits: CreditLimitsResource,
    video_storage: VideoStorageResource,
) -> Iterator[AssetObservation | MaterializeResult]:
    handle = generation_task
    try:
        task = wait_for_terminal(
            rivya.client(), handle.task_id, submitted_at=handle.submitted_at, deadline_at=handle.deadline_at
        )
    except TaskDeadlineExceeded as exc:
        raise Failure(str(exc), allow_retries=False) from None
    ledger = credit_limits.ledger(context.instance)
    record = ledger.find_by_task(task.id)
    if record is not None and record.status != task.status:  # this step saw the end before the sensor did
        record_terminal(ledger, task)
        yield generation_task_observation(handle.brief_id, task)  # yielded, not logged: kept if the step fails
    if task.status == "failed":
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
            lineage={
                "brief_id": handle.brief_id,
                "model": handle.model,
                "prompt": handle.prompt,
                "params": handle.params,
                "idempotency_key": handle.idempotency_key,
                "dagster_run_id": context.run_id,
            },
        )
    ledger.mark_stored(task.id, uri=delivery.video.uri, sha256=delivery.video.sha256)
    yield MaterializeResult(
        metadata=stored_video_metadata(delivery, task, handle),
        check_results=stored_video_checks(delivery, handle),
    )


@contextmanager
def refused_media_reported(task_id: str) -> Iterator[None]:
    """A result URL the rules refuse is a Failure that says so; only a transient fetch error may be retried."""
    try:
        yield
    except MediaFetchError as exc:
        transient = exc.reason in ("http_status", "transport")
        raise Failure(f"Result video of task {task_id} not stored: {exc}", allow_retries=transient) from None


def stored_video_metadata(delivery, task, handle: TaskHandle) -> dict[str, Any]:
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


def stored_video_checks(delivery, handle: TaskHandle) -> list[AssetCheckResult]:
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
