"""Typed views of Rivya's responses.

Tolerant by design: unknown fields are kept (`extra="allow"`), fields docs/rivya-api.md marks [assumed]
are optional, so a new field or a missing one on the real API does not break a run.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class TaskStatus(StrEnum):
    """Where a paid task stands: Rivya's four statuses, and the two only the ledger writes."""

    SUBMITTING = "submitting"  # ledger only: the create went out and its answer is not recorded yet
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"  # ledger only: no terminal status before the task's deadline, no longer polled


PENDING_STATUSES = frozenset({TaskStatus.QUEUED, TaskStatus.PROCESSING})  # Rivya is still working: poll again
TERMINAL_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED})  # Rivya's last word: never polled again


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ModelParam(ApiModel):
    key: str
    type: Literal["select", "number", "text"] | str = "select"
    required: bool = False
    default: Any = None
    options: list[Any] | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None


class ModelInfo(ApiModel):
    """One entry of GET /api/v1/models: what a model accepts and what it costs."""

    id: str
    display_name: str | None = None
    category: str | None = None
    base_credits: int | None = None
    billing_type: str | None = None
    max_prompt_length: int | None = None
    params: list[ModelParam] = []
    api_status: str | None = None
    supported_api_inputs: list[str] | None = None
    reference_media: Any = None


class FileObject(ApiModel):
    """An uploaded reference (POST /api/v1/files)."""

    id: str
    kind: str
    url: str
    object: str | None = None
    name: str | None = None
    mime_type: str | None = None
    size_bytes: int | None = None
    duration_seconds: float | None = None
    duration_token: str | None = None
    created_at: str | None = None


class TaskResult(ApiModel):
    primary_url: str | None = None
    urls: list[str] = []

    @property
    def video_url(self) -> str | None:
        return self.primary_url or (self.urls[0] if self.urls else None)


class TaskError(ApiModel):
    code: str = "generation_failed"
    message: str = ""


class GenerationTask(ApiModel):
    """A generation task (POST/GET /api/v1/generations)."""

    id: str
    status: str  # a TaskStatus as a rule; kept as text so that a status added by Rivya later does not break a run
    model: str | None = None
    reserved_credits: int = 0
    final_credits: int = 0
    created_at: str | None = None
    updated_at: str | None = None
    result: TaskResult | None = None
    error: TaskError | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def refunded_credits(self) -> int:
        """Credits given back: the whole reservation of a failed task."""
        return self.reserved_credits if self.status == TaskStatus.FAILED else 0
