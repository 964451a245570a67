"""The one place the Dagster definitions are assembled (`dagster dev` loads `defs` from here)."""

from __future__ import annotations

from typing import Any

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
from .defs.resources import (
    BriefsResource,
    CreditLimitsResource,
    LedgerResource,
    RivyaResource,
    VideoQcResource,
    VideoStorageResource,
    from_settings,
)
from .defs.schedules import build_discovery_schedule
from .defs.sensors import pending_generation_tasks, resend_job, store_video_job
from .defs.store_batch import store_videos
from .settings import Settings

ASSETS = [video_brief, reference_uploads, generation_task, stored_video]


def build_resources(settings: Settings) -> dict[str, Any]:
    """Every resource, each field set from the setting of the same name; the API key only ever through EnvVar."""
    return {
        "rivya": from_settings(RivyaResource, settings, api_key=EnvVar("RIVYA_API_KEY")),
        "credit_limits": from_settings(CreditLimitsResource, settings),
        "ledger": from_settings(LedgerResource, settings),
        "video_storage": from_settings(VideoStorageResource, settings),
        "video_qc": from_settings(VideoQcResource, settings),
        "briefs": from_settings(BriefsResource, settings),
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
        jobs=[store_videos, store_video_job, resend_job],
        sensors=[pending_generation_tasks],
        schedules=[build_discovery_schedule(settings.discovery_cron)],
        resources=build_resources(settings),
        # A run's steps are sequential for one brief: one process per run, not one per step (each step process
        # would import Dagster and this code again). deploy/ swaps in the k8s or celery executor for scale-out.
        executor=executor,
    )


defs = build_definitions()
