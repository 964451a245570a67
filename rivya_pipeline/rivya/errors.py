"""Typed errors: the envelope's `code` is the contract, the HTTP status is only a fallback.

Every error knows whether retrying can change the outcome, so callers (the retry policy, Dagster
run retries) never repeat a request that is doomed or that would cost money twice.
"""

from __future__ import annotations

from typing import Any


class RivyaError(Exception):
    """Base of every error this client raises."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str = "",
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        parts = [f"{self.code}: {self.message}" if self.code else self.message]
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.request_id:
            parts.append(f"requestId={self.request_id}")
        return " | ".join(parts)


class RequestValidationError(RivyaError, ValueError):
    """Our own check refused a request before any HTTP call: names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}", code="invalid_request")
        self.field = field
        self.rule = rule

    def __str__(self) -> str:
        return self.message


class ApiError(RivyaError):
    """An error answered by the API (or by whatever stands in front of it)."""


class ValidationFailed(ApiError):
    pass


class AuthenticationError(ApiError):
    """401: the key is missing, invalid, revoked or expired. Retrying cannot help."""


class ApiKeyMissing(AuthenticationError):
    pass


class ApiKeyInvalid(AuthenticationError):
    pass


class ApiKeyRevoked(AuthenticationError):
    pass


class ApiKeyExpired(AuthenticationError):
    pass


class ScopeDenied(ApiError):
    pass


class NotFound(ApiError):
    pass


class IdempotencyConflict(ApiError):
    """Same Idempotency-Key, different body: a bug or a changed request, never retried."""


class InsufficientCredits(ApiError):
    """The wallet cannot pay for the task: stop submitting until it is topped up."""


class RateLimited(ApiError):
    retryable = True


class PublicApiDisabled(ApiError):
    retryable = True


class ServerError(ApiError):
    """internal_error or any 5xx without a known code."""

    retryable = True


class UnknownApiError(ApiError):
    """A code this client does not know; retryable only when the status is 5xx."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retryable = self.status is not None and self.status >= 500


class TransportError(RivyaError):
    """Timeouts, refused or reset connections: the request may or may not have been performed."""

    retryable = True


ERRORS_BY_CODE: dict[str, type[ApiError]] = {
    "validation_failed": ValidationFailed,
    "api_key_missing": ApiKeyMissing,
    "api_key_invalid": ApiKeyInvalid,
    "api_key_revoked": ApiKeyRevoked,
    "api_key_expired": ApiKeyExpired,
    "api_scope_denied": ScopeDenied,
    "not_found": NotFound,
    "idempotency_conflict": IdempotencyConflict,
    "insufficient_credits": InsufficientCredits,
    "rate_limited": RateLimited,
    "public_api_disabled": PublicApiDisabled,
    "internal_error": ServerError,
}


def error_for_status(status: int) -> type[ApiError]:
    """The class for an answer without a readable envelope (a proxy's HTML page, say)."""
    if status == 429:
        return RateLimited
    if status >= 500:
        return ServerError
    return UnknownApiError
