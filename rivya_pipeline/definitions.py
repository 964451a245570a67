"""The one place the Dagster definitions are assembled (`dagster dev` loads `defs` from here)."""

from __future__ import annotations

from dagster import Definitions, EnvVar, ExecutorDefinition, in_process_executor

from .defs.assets import generation_task, reference_uploads, stored_video, video_brief
from .defs.inputs import (
    BRIEF_LOADER,
    TASK_LOADER,
    UPLOADS_LOADER,
    brief_from_folder,
    task_from_ledger,
    uploads_from_event_log,
)
from .defs.resources import BriefsResource, CreditLimitsResource, RivyaResource, VideoStorageResource
from .defs.schedules import build_discovery_schedule
from .defs.sensors import pending_generation_tasks
from .settings import Settings

ASSETS = [video_brief, reference_uploads, generation_task, stored_video]


def build_resources(settings: Settings) -> dict[str, object]:
    return {
        "rivya": RivyaResource(
            api_key=EnvVar("RIVYA_API_KEY"),
            base_url=settings.base_url,
            timeout_seconds=settings.request_timeout_seconds,
            poll_requests_per_second=settings.poll_requests_per_second,
            poll_concurrency=settings.poll_concurrency,
            allow_local_media=settings.allow_local_media,
            max_media_mb=settings.max_media_mb,
        ),
        "credit_limits": CreditLimitsResource(
            max_credits_per_run=settings.max_credits_per_run,
            max_credits_per_day=settings.max_credits_per_day,
            min_wallet_credits=settings.min_wallet_credits,
            ledger_url=settings.ledger_url,
            task_deadline_minutes=settings.task_deadline_minutes,
        ),
        "video_storage": VideoStorageResource(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            checksum_when_required=settings.s3_checksum_when_required,
            chunk_mb=settings.s3_chunk_mb,
        ),
        "briefs": BriefsResource(path=str(settings.requests_path)),
        BRIEF_LOADER: brief_from_folder,
        UPLOADS_LOADER: uploads_from_event_log,
        TASK_LOADER: task_from_ledger,
    }


def build_definitions(
    settings: Settings | None = None, executor: ExecutorDefinition = in_process_executor
) -> Definitions:
    settings = settings or Settings.from_env()
    return Definitions(
        assets=ASSETS,
        sensors=[pending_generation_tasks],
        schedules=[build_discovery_schedule(settings.discovery_cron)],
        resources=build_resources(settings),
        # A run's steps are sequential for one brief: one process per run, not one per step (a run took 11 s
        # idle with a process per step). deploy/ swaps in the k8s or celery executor for scale-out.
        executor=executor,
    )


defs = build_definitions()
