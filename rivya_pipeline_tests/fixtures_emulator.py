"""Emulator fixtures: one real Rivya emulator (API host + media host over HTTP) per test session, reset to a
known fast config before every test so tests never see each other's tasks, wallets, faults or stats."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rivya_pipeline.emulator import DEFAULT_TEST_KEY, EmulatorConfig, RivyaEmulator
from rivya_pipeline.emulator.config import DEFAULT_ACCOUNT
from rivya_pipeline.rivya import RetryPolicy, RivyaClient

TEST_API_KEY = DEFAULT_TEST_KEY
TEST_ACCOUNT = DEFAULT_ACCOUNT
TEST_CREDITS = 10_000


def fast_emulator_config(**overrides: Any) -> EmulatorConfig:
    """The per-test default (test key, 10,000 credits, sub-second lifecycle) with any field overridden."""
    values: dict[str, Any] = {"initial_credits": TEST_CREDITS, "queued_seconds": 0.2, "processing_seconds": 0.5}
    return EmulatorConfig(**(values | overrides))


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[RivyaEmulator]:
    with RivyaEmulator(fast_emulator_config()) as emulator:
        yield emulator


@pytest.fixture
def emulator(emulator_server: RivyaEmulator) -> RivyaEmulator:
    emulator_server.reset(fast_emulator_config())
    return emulator_server


@pytest.fixture
def configure_emulator(emulator: RivyaEmulator) -> Callable[..., RivyaEmulator]:
    """`configure_emulator(time_scale=60, failure_rate=1.0)` resets the emulator to the fast default with
    those fields overridden, and returns it."""

    def configure(**overrides: Any) -> RivyaEmulator:
        emulator.reset(fast_emulator_config(**overrides))
        return emulator

    return configure


@pytest.fixture
def client(emulator: RivyaEmulator) -> Iterator[RivyaClient]:
    """A client of the test key that never retries, so each call is one request (test_client.py has its own)."""
    with RivyaClient(TEST_API_KEY, emulator.base_url, retry=RetryPolicy(max_attempts=1)) as client:
        yield client
