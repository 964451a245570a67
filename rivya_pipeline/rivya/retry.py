"""The one retry policy of the client.

Retries what retrying can change (429, 5xx, public_api_disabled, timeouts, resets) and nothing
else. Honours Retry-After (capped), otherwise exponential backoff with full jitter; bounded in
attempts and in total time. Paid creates are safe to retry only because the caller sends the same
Idempotency-Key on every attempt: this module never builds requests, it only repeats them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from .errors import RivyaError

T = TypeVar("T")
log = logging.getLogger(__name__)


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RivyaError) and exc.retryable


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    max_elapsed_seconds: float = 120.0
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 20.0
    retry_after_cap_seconds: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap_seconds)
        jitter = wait_random_exponential(multiplier=self.backoff_base_seconds, max=self.backoff_max_seconds)
        return jitter(state)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("Rivya call failed (%s); attempt %d, retrying in %.1fs", exc, state.attempt_number, delay)

    def call(self, fn: Callable[[], T]) -> T:
        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            stop=stop_after_attempt(self.max_attempts) | stop_before_delay(self.max_elapsed_seconds),
            wait=self._wait,
            sleep=self.sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        return retrying(fn)
