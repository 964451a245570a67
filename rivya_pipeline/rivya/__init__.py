"""Rivya Public API v1 client: typed models, typed errors, one retry policy. No Dagster import."""

from .client import DEFAULT_BASE_URL, RivyaClient
from .errors import (
    ApiError,
    AuthenticationError,
    IdempotencyConflict,
    InsufficientCredits,
    NotFound,
    RateLimited,
    RequestValidationError,
    RivyaError,
    ServerError,
    TransportError,
    ValidationFailed,
)
from .generation import DEFAULT_MODEL, KLING_3_0, GenerationRequest, ReferenceImage, normalize_params
from .models import (
    PENDING_STATUSES,
    TERMINAL_STATUSES,
    FileObject,
    GenerationTask,
    ModelInfo,
    TaskError,
    TaskResult,
    TaskStatus,
)
from .retry import RetryPolicy

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MODEL",
    "KLING_3_0",
    "PENDING_STATUSES",
    "TERMINAL_STATUSES",
    "ApiError",
    "AuthenticationError",
    "FileObject",
    "GenerationRequest",
    "GenerationTask",
    "IdempotencyConflict",
    "InsufficientCredits",
    "ModelInfo",
    "NotFound",
    "RateLimited",
    "ReferenceImage",
    "RequestValidationError",
    "RetryPolicy",
    "RivyaClient",
    "RivyaError",
    "ServerError",
    "TaskError",
    "TaskResult",
    "TaskStatus",
    "TransportError",
    "ValidationFailed",
    "normalize_params",
]
