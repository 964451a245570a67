"""Rivya's error envelope and the HTTP status of every error code (docs/rivya-api.md, section 3)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from starlette.responses import JSONResponse

STATUS_BY_CODE: dict[str, int] = {
    "validation_failed": 400,
    "api_key_missing": 401,
    "api_key_invalid": 401,
    "api_key_revoked": 401,
    "api_key_expired": 401,
    "insufficient_credits": 402,
    "api_scope_denied": 403,
    "not_found": 404,
    "idempotency_conflict": 409,
    "rate_limited": 429,
    "internal_error": 500,
    "public_api_disabled": 503,
}


class ApiError(Exception):
    """Raised anywhere in a handler; the app turns it into the envelope with the code's status."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.headers = headers or {}


def new_id(prefix: str) -> str:
    """Opaque ids such as task_…, file_…, req_…."""
    return f"{prefix}_{secrets.token_hex(12)}"


def iso_timestamp(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and Z, e.g. 2026-05-11T00:00:00.000Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_response(
    code: str, message: str, headers: dict[str, str] | None = None, status: int | None = None
) -> JSONResponse:
    """The envelope; `status` only for codes outside the contract table (e.g. a proxy's generic 5xx)."""
    body = {"error": {"code": code, "message": message, "requestId": new_id("req")}}
    return JSONResponse(body, status_code=status or STATUS_BY_CODE[code], headers=headers)
