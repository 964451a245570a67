"""A faithful, strict local fake of Rivya Public API v1 (the contract: docs/rivya-api.md) for tests and demos.

Independent of the project's client on purpose: it checks the contract rather than agreeing with the client.
Deterministic failure: a prompt containing "[emulator:fail]" always ends in status `failed` (refunded).
Result videos move, have colour and, with sound asked for, a tone; a prompt containing "[emulator:black]" (or
frozen, silent, no_audio, wrong_aspect) gets that faulty video instead, as does a `bad_video` fault rule.
"""

from .config import ALL_SCOPES, DEFAULT_TEST_KEY, FAIL_MARKER, ApiKeyConfig, EmulatorConfig, FaultRule
from .server import RivyaEmulator

__all__ = [
    "ALL_SCOPES",
    "DEFAULT_TEST_KEY",
    "FAIL_MARKER",
    "ApiKeyConfig",
    "EmulatorConfig",
    "FaultRule",
    "RivyaEmulator",
]
