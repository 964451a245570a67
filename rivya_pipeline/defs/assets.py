"""The asset graph, one partition per brief: video_brief -> reference_uploads -> generation_task -> stored_video.

Each asset is thin: the work lives in the client, the submission module, the ledger, the poller and the delivery
module, and what it records is built in events.py. An asset turns the errors it can explain into a `Failure`
that says whether a retry can help.
"""

import warnings
from collections.abc import Iterator

from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetObservation,
    DataVersion,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    PreviewWarning,
    asset,
)

from ..briefs import Brief
from ..ledger import BudgetExceeded, StaleSubmission
from ..rivya import FileObject
from ..submission import SubmissionError, submit
from . import events
from .inputs import BRIEF_LOADER, TASK_LOADER, UPLOADS_LOADER, TaskHandle
from .resources import (
    PAID_CREATE_POOL,
    BriefsResource,
    CreditLimitsResource,
    LedgerResource,
    RivyaResource,
    VideoQcResource,
    VideoStorageResource,
)
from .storing import StoredVideo, store_video
from .video_qc import QC_CHECKS

BRIEF_PARTITIONS = "briefs"  # the dynamic partitions: one per brief id
briefs_partitions = DynamicPartitionsDefinition(name=BRIEF_PARTITIONS)
GROUP = "video_generation"
BATCH_TAG = "rivya/batch"
# Set on a run whose generation_task refused to submit on purpose (budget, stale or changed brief, a refusal Rivya
# will repeat): discovery never relaunches its version (a run that merely died is relaunched).
NOT_SUBMITTED_TAG = "rivya/not_submitted"
RESEND_TAG = "rivya/resend"  # on a run the sensor launched to re-send one unanswered create: its Idempotency-Key


@asset(
    partitions_def=briefs_partitions,
    group_name=GROUP,
    kinds={"yaml"},
    description="One YAML brief, validated offline (prompt, params, reference images). Its data version is the "
    "hash of what it asks for, so editing a brief marks everything downstream stale.",
)
def video_brief(context: AssetExecutionContext, briefs: BriefsResource, ledger: LedgerResource) -> MaterializeResult:
    brief = briefs.load(context.partition_key, ledger.for_instance(context.instance))
    return MaterializeResult(data_version=DataVersion(brief.content_hash), metadata=events.brief_metadata(brief))


@asset(
    partitions_def=briefs_partitions,
    group_name=GROUP,
    kinds={"rivya"},
    ins={"video_brief": AssetIn(input_manager_key=BRIEF_LOADER)},
    description="The brief's reference images, uploaded through Rivya's Files API (free; no credits).",
)
def reference_uploads(context: AssetExecutionContext, video_brief: Brief, rivya: RivyaResource) -> MaterializeResult:
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
    return MaterializeResult(metadata=events.uploads_metadata(uploads, video_brief.request))


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
    ledger: LedgerResource,
) -> MaterializeResult:
    refuse_a_resend_of_another_version(context, video_brief)
    try:
        submitted = submit(
            rivya.client(),
            ledger.for_instance(context.instance),
            video_brief.request,
            reference_uploads,
            brief_id=video_brief.id,
            budget_run_id=context.run.tags.get(BATCH_TAG, context.run_id),
            client_request_id=context.run_id,
            limits=credit_limits.limits(),
            deadline=rivya.task_deadline(),
        )
    except (BudgetExceeded, StaleSubmission) as exc:
        context.instance.add_run_tags(context.run_id, {NOT_SUBMITTED_TAG: type(exc).__name__})
        raise Failure(f"Not submitted: {exc}", allow_retries=False) from None
    except SubmissionError as exc:
        if not exc.retryable:
            context.instance.add_run_tags(context.run_id, {NOT_SUBMITTED_TAG: type(exc).__name__})
        raise Failure(str(exc), allow_retries=exc.retryable) from None
    return MaterializeResult(metadata=events.submitted_metadata(submitted, video_brief.request))


def refuse_a_resend_of_another_version(context: AssetExecutionContext, brief: Brief) -> None:
    """A run the sensor launched to re-send one unanswered create sends that create or nothing."""
    resending = context.run.tags.get(RESEND_TAG)
    if resending and resending != brief.request.idempotency_key():
        raise Failure(
            f"This run was to re-send the unanswered create {resending}, but brief {brief.id!r} now asks for "
            "something else: nothing sent. The brief's own runs submit its new version.",
            allow_retries=False,
        )


# Partitioned like the asset: each brief's video has its own check results. Without partitions_def Dagster
# records them as checks of the whole asset, and a later brief's pass hides an earlier brief's failure.
# Dagster 1.13 calls partitioned checks a preview and warns on every load; the warning is silenced here only.
# The integrity checks block (a failure fails the step, after the materialization is recorded); the QC checks do
# not, so a stored video that QC finds unusable is still a success of the step that stored it (video_qc.py).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", PreviewWarning)
    STORED_VIDEO_CHECKS = [
        AssetCheckSpec(
            name,
            asset="stored_video",
            blocking=name not in QC_CHECKS,
            partitions_def=briefs_partitions,
            description=text,
        )
        for name, text in [
            *events.STORED_VIDEO_CHECK_DESCRIPTIONS.items(),
            *((name, check.description) for name, check in QC_CHECKS.items()),
        ]
    ]


@asset(
    partitions_def=briefs_partitions,
    group_name=GROUP,
    kinds={"s3"},
    check_specs=STORED_VIDEO_CHECKS,
    ins={"generation_task": AssetIn(input_manager_key=TASK_LOADER)},
    description="The finished video in S3 ({prefix}/{brief}/{task}.mp4) with a JSON lineage sidecar, streamed from "
    "Rivya's media host and verified: decodable, right duration and aspect ratio, SHA-256 of the stored object. "
    "QC checks the sound, black and frozen frames; the partition page shows a poster and a contact sheet.",
)
def stored_video(
    context: AssetExecutionContext,
    generation_task: TaskHandle,
    rivya: RivyaResource,
    ledger: LedgerResource,
    video_storage: VideoStorageResource,
    video_qc: VideoQcResource,
) -> Iterator[AssetObservation | MaterializeResult]:
    stores = store_video(
        generation_task,
        run_id=context.run_id,
        tasks=ledger.for_instance(context.instance),
        rivya=rivya,
        video_storage=video_storage,
        video_qc=video_qc,
    )
    for event in stores:
        if isinstance(event, StoredVideo):
            # Given to the materialization only: a MaterializeResult's metadata is also written, pictures and all,
            # into the step's output event, which doubled what each video cost the event log.
            context.add_asset_metadata(event.metadata)
            yield MaterializeResult(check_results=event.checks)
        else:
            yield event
