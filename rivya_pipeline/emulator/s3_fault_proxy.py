"""A fault-injecting reverse proxy for an S3 endpoint, so tests and `bench chaos` can give the pipeline's S3 leg real
5xx answers.

It sits on 127.0.0.1 in front of the local S3 server (moto) and forwards every request byte for byte,
streaming both ways with httpx. A seeded fraction of requests is answered with S3's own 500
InternalError / 503 SlowDown instead of being forwarded (the body is read and dropped first, as a real
front end would). The fraction is set per S3 operation, so multipart part uploads can be hit often
without slowing every other call with boto3's backoff. The same request (method, path and query, so a
part upload keeps its upload id and part number) is refused at most ``max_faults_per_request`` times in
a row: the faults stay transient, within boto3's retry budget (3 attempts in "standard" mode). What
exceeds that budget is a different failure (a dead store) with its own tests.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from .serving import BackgroundServers, bind, url_of

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded. `expect` neither: httpx
# does not do the "100 Continue" handshake, it streams the body on at once.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_FAULTS = (
    (500, "InternalError", "We encountered an internal error. Please try again."),
    (503, "SlowDown", "Please reduce your request rate."),
)


def s3_operation(method: str, path: str, query: str) -> str:
    """The S3 operation a path-style request (`/bucket/key?query`) performs, for the fault tallies."""
    params = {part.split("=", 1)[0] for part in query.split("&") if part}
    if method == "PUT":
        return "UploadPart" if {"partNumber", "uploadId"} <= params else "PutObject"
    if method == "POST":
        return "CreateMultipartUpload" if "uploads" in params else "CompleteMultipartUpload"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in params else "DeleteObject"
    if method == "HEAD":
        return "HeadObject"
    if "uploads" in params:
        return "ListMultipartUploads"
    return "GetObject" if "/" in path.strip("/") else "ListObjects"


def _error_body(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>fault-proxy</RequestId></Error>"
    ).encode()


class S3FaultProxy:
    """`with S3FaultProxy(upstream, {"*": 0.05, "UploadPart": 0.2}, seed=1) as proxy:` point boto3 at `proxy.url`.

    `fault_rates` maps an S3 operation (see `s3_operation`) to the share of its requests that fail; "*" is
    the rate of every operation not named.
    """

    def __init__(
        self, upstream: str, fault_rates: dict[str, float], *, seed: int, max_faults_per_request: int = 2
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.url = ""
        self._fault_rates = fault_rates
        self._max_faults_per_request = max_faults_per_request
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._faults_in_a_row: Counter[tuple[str, str, str]] = Counter()
        self._injected: Counter[str] = Counter()
        self._forwarded: Counter[str] = Counter()
        self._client: httpx.AsyncClient | None = None
        self._servers: BackgroundServers | None = None
        self._down_for = 0.0  # an outage armed by go_down: its length, from the next request on
        self._down_until = 0.0  # time.monotonic() until which every request is refused

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> S3FaultProxy:
        sock = bind()
        self.url = url_of(sock)
        self._servers = BackgroundServers("s3-fault-proxy", [(self, sock)], around=self._upstream_client).start()
        return self

    def stop(self) -> None:
        if self._servers is not None:
            self._servers.stop()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @asynccontextmanager
    async def _upstream_client(self) -> AsyncIterator[None]:
        """One client to the S3 server for the proxy's life, on the loop it serves on."""
        async with httpx.AsyncClient(base_url=self.upstream, timeout=httpx.Timeout(60.0), trust_env=False) as client:
            self._client = client
            yield

    def go_down(self, seconds: float) -> None:
        """Refuse every request with S3's 503 SlowDown for `seconds` from the next request on, whatever the fault
        rates say (so the outage meets the pipeline however long it takes to get there)."""
        with self._lock:
            self._down_for = seconds

    def outage_ends(self) -> float | None:
        """The time.monotonic() at which the outage `go_down` armed ends, once a request has opened it (else None)."""
        with self._lock:
            return self._down_until or None

    # -- tallies -----------------------------------------------------------------------------

    def injected(self) -> dict[str, int]:
        """S3 operation -> how many of its requests were answered with a 5xx."""
        with self._lock:
            return dict(self._injected)

    def forwarded(self) -> dict[str, int]:
        """S3 operation -> how many of its requests reached the S3 server."""
        with self._lock:
            return dict(self._forwarded)

    # -- the proxy ---------------------------------------------------------------------------

    def _fault_for(self, identity: tuple[str, str, str]) -> tuple[int, str, str] | None:
        with self._lock:
            operation = s3_operation(*identity)
            if self._down_for:
                self._down_until, self._down_for = time.monotonic() + self._down_for, 0.0
            if time.monotonic() < self._down_until:
                self._injected[operation] += 1
                return 503, "SlowDown", "Please reduce your request rate."
            rate = self._fault_rates.get(operation, self._fault_rates.get("*", 0.0))
            if self._faults_in_a_row[identity] < self._max_faults_per_request and self._rng.random() < rate:
                self._faults_in_a_row[identity] += 1
                self._injected[operation] += 1
                return self._rng.choice(_FAULTS)
            self._faults_in_a_row.pop(identity, None)
            self._forwarded[operation] += 1
            return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        path = scope["raw_path"].decode("ascii")
        query = scope["query_string"].decode("ascii")
        fault = self._fault_for((request.method, path, query))
        if fault is not None:
            async for _ in request.stream():  # take the whole body, as a front end that fails late does
                pass
            status, code, message = fault
            response: Response = Response(_error_body(code, message), status_code=status, media_type="application/xml")
        else:
            response = await self._forward(request, path, query)
        await response(scope, receive, send)

    async def _forward(self, request: Request, path: str, query: str) -> Response:
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        assert self._client is not None
        upstream_request = self._client.build_request(
            request.method,
            httpx.URL(self.upstream + path, query=query.encode("ascii")),
            headers=headers,  # Host included: SigV4 signed the proxy's host, and the server sees the same value
            content=request.stream() if has_body else None,
        )
        upstream = await self._client.send(upstream_request, stream=True)
        response_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        return StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            headers=response_headers,
            background=BackgroundTask(upstream.aclose),
        )
