"""A small, typed client for Rivya Public API v1 (httpx + pydantic, no Dagster).

One pooled httpx client, one retry policy, typed errors. The API key is attached by an auth hook
that only ever sends it to the API's own origin, and it never appears in repr, logs or errors.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Generator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel

from ..settings import DEFAULT_BASE_URL
from .errors import ERRORS_BY_CODE, RivyaError, TransportError, UnknownApiError, error_for_status
from .models import FileObject, GenerationTask, ModelInfo
from .retry import RetryPolicy
from .tls import shared_ssl_context

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


class _BearerForApiOrigin(httpx.Auth):
    """Adds the key only to requests for the API's own origin (never to a CDN or a redirect target)."""

    def __init__(self, api_key: str, base_url: str) -> None:
        self._api_key = api_key
        self._origin = _origin(httpx.URL(base_url))

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) == self._origin:
            request.headers["Authorization"] = f"Bearer {self._api_key}"
        yield request


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        from datetime import UTC, datetime

        return max((parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


class RivyaClient:
    """Rivya Public API v1. Thread-safe (httpx.Client is); close it or use it as a context manager."""

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        timeout_seconds: float = 30.0,
        connect_timeout_seconds: float = 10.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 32,
    ) -> None:
        if not api_key:
            raise ValueError("api_key: must be set (RIVYA_API_KEY)")
        if not (api_key.isascii() and api_key.isprintable()) or any(ch.isspace() for ch in api_key):
            # Such a key cannot go in a header: httpx would fail on every attempt and echo it, escaped, in the error.
            raise ValueError("api_key: must be printable ASCII without spaces or line breaks (check RIVYA_API_KEY)")
        scheme = urlsplit(base_url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"base_url: must be an http(s) URL (got scheme {scheme!r})")
        self.base_url = base_url.rstrip("/")
        # Requests name absolute URLs: httpx parses one once, where it parses a path and then the joined URL.
        self._api_root = self.base_url + "/api/v1"
        self.retry = retry or RetryPolicy()
        self._api_key = api_key
        self._timeout = httpx.Timeout(timeout_seconds, connect=connect_timeout_seconds)
        self._http = self._open_pool(max_connections)

    def _open_pool(self, max_connections: int) -> httpx.Client:
        return httpx.Client(
            auth=_BearerForApiOrigin(self._api_key, self.base_url),
            timeout=self._timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,
            headers={"User-Agent": "rivya-pipeline/0.1", "Accept": "application/json"},
            verify=shared_ssl_context(trust_env=True),
        )

    def __repr__(self) -> str:
        return f"RivyaClient(base_url={self.base_url!r}, api_key='***')"

    def __enter__(self) -> RivyaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def with_own_connection(self) -> RivyaClient:
        """The same client (key, base URL, timeouts, retry policy) over one keep-alive connection of its own:
        for a worker thread of many, cheaper per request than a share of one large pool."""
        twin = copy.copy(self)
        twin._http = self._open_pool(max_connections=1)
        return twin

    # -- endpoints ---------------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        data = self._call("GET", "/models").json()
        return [ModelInfo.model_validate(m) for m in data.get("data", [])]

    def get_model(self, model_id: str) -> ModelInfo | None:
        return next((m for m in self.list_models() if m.id == model_id), None)

    def upload_file(
        self,
        path: Path,
        *,
        kind: str,
        mime_type: str,
        model: str | None = None,
        client_request_id: str | None = None,
    ) -> FileObject:
        """Upload through the Files API. Uploads cost nothing, so a retry that duplicates one is harmless."""
        fields = {"kind": kind}
        if model:
            fields["model"] = model
        if client_request_id:
            fields["client_request_id"] = client_request_id[:128]

        def send() -> httpx.Response:
            with path.open("rb") as fh:
                return self._http.post(
                    self._api_root + "/files", data=fields, files={"file": (path.name, fh, mime_type)}
                )

        return _parsed(FileObject, self._call_with(send))

    def get_file(self, file_id: str) -> FileObject:
        return _parsed(FileObject, self._call("GET", f"/files/{file_id}"))

    def create_generation(self, body: dict[str, Any], *, idempotency_key: str) -> GenerationTask:
        """Create a paid task. Every retry carries the same Idempotency-Key, so a lost answer never costs twice."""
        if not idempotency_key:
            raise ValueError("idempotency_key: a paid create is never sent without one")
        headers = {"Idempotency-Key": idempotency_key}
        return _parsed(GenerationTask, self._call("POST", "/generations", json=body, headers=headers))

    def get_generation(self, task_id: str) -> GenerationTask:
        return _parsed(GenerationTask, self._call("GET", f"/generations/{task_id}"))

    def get_credits(self) -> int:
        return int(self._call("GET", "/credits").json()["current_credits"])

    # -- plumbing ----------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._call_with(lambda: self._http.request(method, self._api_root + path, **kwargs))

    def _call_with(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        """A successful response, after the retry policy's attempts; otherwise its typed error."""
        return self.retry.call(lambda: self._checked(send))

    def _checked(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        try:
            response = send()
        except httpx.TransportError as exc:
            raise TransportError(self._scrub(f"{type(exc).__name__}: {exc}"), code="transport_error") from None
        if response.is_success:
            return response
        raise self._error_from(response)

    def _error_from(self, response: httpx.Response) -> RivyaError:
        envelope: dict[str, Any] = {}
        try:
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                envelope = body["error"]
        except ValueError:
            pass
        code = str(envelope.get("code") or "")
        message = self._scrub(str(envelope.get("message") or response.reason_phrase or "no message"))
        cls = ERRORS_BY_CODE.get(code) or (UnknownApiError if code else error_for_status(response.status_code))
        error = cls(
            message,
            code=code or f"http_{response.status_code}",
            status=response.status_code,
            request_id=envelope.get("requestId") or response.headers.get("x-request-id"),
            retry_after=_parse_retry_after(response.headers.get("Retry-After")),
        )
        log.info("Rivya %s %s -> %s", response.request.method, response.request.url.path, error)
        return error

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***")


def _parsed(model: type[M], response: httpx.Response) -> M:
    """The answer's raw bytes validated straight into the model: parsed once, with no dict in between."""
    return model.model_validate_json(response.content)
