"""Fault injection: which rule fires for a request (race-free, seeded) and what the client then sees."""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from starlette.responses import HTMLResponse, Response
from starlette.types import Receive, Scope, Send

from .config import FaultKind, FaultRule
from .errors import error_response

# Kinds that never replace a response before the request is handled; `take` hands them out only by name.
_DEFERRED_KINDS: frozenset[str] = frozenset({"lost_response", "bad_video"})
_PROXY_502_PAGE = (
    "<html>\r\n<head><title>{status} Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>{status} Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


class FaultInjector:
    """Holds the rules, the remaining count of each `times` rule, the window of each `for_seconds` rule and a
    seeded RNG, all behind one lock so that concurrent requests consume a scripted fault exactly once.
    `now` is the emulator's clock (emulated seconds), which times the `for_seconds` windows."""

    def __init__(self, rules: list[FaultRule], seed: int, *, now: Callable[[], float]) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._now = now
        self._rules: list[FaultRule] = []
        self._remaining: list[int | None] = []
        self._opened: list[float | None] = []
        self._injected: Counter[str] = Counter()
        self.replace(rules)

    def replace(self, rules: list[FaultRule]) -> None:
        """Install new rules: their counts start afresh and their windows open at their first matching request."""
        with self._lock:
            self._rules = list(rules)
            self._remaining = [rule.times for rule in rules]
            self._opened = [None for _ in rules]

    def injected_counts(self) -> dict[str, int]:
        """How often each "endpoint:kind" fault has fired, for stats."""
        with self._lock:
            return dict(self._injected)

    def windows(self) -> list[dict[str, Any]]:
        """Each `for_seconds` rule's window in emulated seconds: `pending` until its first matching request,
        then `open` from `opened_at` until `closes_at`, then `closed` for good."""
        with self._lock:
            now = self._now()
            windows = []
            for index, (rule, opened) in enumerate(zip(self._rules, self._opened, strict=True)):
                if rule.for_seconds is None:
                    continue
                closes = None if opened is None else opened + rule.for_seconds
                state = "pending" if closes is None else "open" if now < closes else "closed"
                windows.append(
                    {
                        "rule": index,
                        "endpoint": rule.endpoint,
                        "kind": rule.kind,
                        "for_seconds": rule.for_seconds,
                        "state": state,
                        "opened_at": opened,
                        "closes_at": closes,
                    }
                )
            return windows

    def take(self, endpoint: str, *, kind: FaultKind | None = None) -> FaultRule | None:
        """The first matching rule that fires now. Without `kind`, a rule decided before the request is handled;
        the deferred kinds are asked for by name at their own moment: `bad_video` while a create makes its task,
        `lost_response` once that create has been performed."""
        with self._lock:
            for index, rule in enumerate(self._rules):
                if not _matches(rule.endpoint, endpoint):
                    continue
                if rule.kind != kind if kind else rule.kind in _DEFERRED_KINDS:
                    continue
                if not self._fires(index, rule):
                    continue
                self._injected[f"{endpoint}:{rule.kind}"] += 1
                return rule
        return None

    def _fires(self, index: int, rule: FaultRule) -> bool:
        if rule.for_seconds is not None:
            now, opened = self._now(), self._opened[index]
            if opened is None:
                self._opened[index] = opened = now
            return now < opened + rule.for_seconds
        remaining = self._remaining[index]
        if remaining is not None:
            if remaining == 0:
                return False
            self._remaining[index] = remaining - 1
            return True
        return rule.rate is None or self._rng.random() < rule.rate


def _matches(rule_endpoint: str, endpoint: str) -> bool:
    """A rule's endpoint "*" matches every request, the media host's too; "api" every API endpoint, not media."""
    if rule_endpoint == "*":
        return True
    if rule_endpoint == "api":
        return endpoint != "media"
    return rule_endpoint == endpoint


class DroppedConnectionResponse(Response):
    """Promises a body it never finishes: the server then closes the socket, so an HTTP client sees a
    transport error (peer closed connection mid-body) rather than any status it could act on."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"4096")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"id":"', "more_body": True})


class StalledResponse(DroppedConnectionResponse):
    """Holds the answer for `delay` seconds, then drops the connection: while it waits, the create is already
    performed and charged, but the client has not heard so, which is the moment a crash test kills it."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self._delay = delay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(self._delay)
        await super().__call__(scope, receive, send)


def fault_response(rule: FaultRule) -> Response:
    """What the client receives for a fault that replaces the answer (every kind but `slow` and `trickle`)."""
    kind = rule.lost_as if rule.kind == "lost_response" else rule.kind
    if kind == "stall":
        return StalledResponse(rule.delay)
    if kind == "rate_limited":
        return error_response("rate_limited", "Too many requests.", headers={"Retry-After": str(rule.retry_after)})
    if kind == "internal_error":
        return error_response("internal_error", "Something went wrong on our side.")
    if kind == "public_api_disabled":
        return error_response("public_api_disabled", "The public API is temporarily disabled.")
    if kind == "server_error":
        return _server_error(rule)
    if kind == "drop_connection":
        return DroppedConnectionResponse()
    raise ValueError(f"fault kind {kind!r} does not replace the response")


def _server_error(rule: FaultRule) -> Response:
    if rule.body == "html":
        return HTMLResponse(_PROXY_502_PAGE.format(status=rule.status), status_code=rule.status)
    if rule.body == "envelope":
        return error_response("upstream_unavailable", "The upstream service did not answer.", status=rule.status)
    return Response(b"", status_code=rule.status)


async def injected_response(injector: FaultInjector, endpoint: str) -> Response | None:
    """The response a fault puts in place of the real one, or None to carry on (after any `slow` delay)."""
    return await applied_fault(injector.take(endpoint))


async def applied_fault(rule: FaultRule | None) -> Response | None:
    """`injected_response` for a rule already taken; a `trickle` only paces the body, so it answers None too."""
    if rule is None or rule.kind == "trickle":
        return None
    if rule.kind == "slow":
        await asyncio.sleep(rule.delay)
        return None
    return fault_response(rule)
