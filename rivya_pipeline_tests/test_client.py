"""RivyaClient against the project's emulator over real HTTP (no mocks of httpx): every error code becomes
its typed exception, retries never cost twice, the key never leaks, bad requests never leave the process,
and a generation goes end to end. The emulator is strict and independent of the client, so a request it
accepts is one Rivya's contract (docs/rivya-api.md) accepts."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from rivya_pipeline.emulator import ApiKeyConfig, FaultRule, RivyaEmulator
from rivya_pipeline.rivya import (
    FileObject,
    GenerationRequest,
    GenerationTask,
    IdempotencyConflict,
    InsufficientCredits,
    NotFound,
    RateLimited,
    RequestValidationError,
    RetryPolicy,
    RivyaClient,
    RivyaError,
    ServerError,
    TransportError,
    ValidationFailed,
)
from rivya_pipeline.rivya.errors import (
    ApiKeyExpired,
    ApiKeyInvalid,
    ApiKeyMissing,
    ApiKeyRevoked,
    PublicApiDisabled,
    ScopeDenied,
    UnknownApiError,
)
from rivya_pipeline.rivya.media import MediaFetcher
from rivya_pipeline_tests.fixtures_emulator import TEST_ACCOUNT, TEST_API_KEY, TEST_CREDITS
from rivya_pipeline_tests.helpers import KLING_PRICE
from rivya_pipeline_tests.test_emulator import encode_image

E = TypeVar("E", bound=BaseException)

REVOKED_KEY = "rvya_sk_revoked_0001"
EXPIRED_KEY = "rvya_sk_expired_0001"
READ_ONLY_KEY = "rvya_sk_read_only_0001"
OTHER_ACCOUNT_KEY = "rvya_sk_other_account_0001"
REPO_PNG = Path(__file__).resolve().parents[1] / "requests" / "images" / "product.png"
TEXT_ONLY = GenerationRequest.build(prompt="a red fox running through fresh snow")
CHANGED_PROMPT = GenerationRequest.build(prompt="a red fox sleeping in fresh snow")
# Natural values the client would have turned into strings; sent raw, the strict emulator must refuse them.
UNSTRINGED_BODY = {"model": "kling-3-0", "prompt": "a fox", "params": {"duration": 5, "sound": False}}
# Fast, generous retries: tests count requests, not seconds.
FAST_RETRY = RetryPolicy(max_attempts=4, max_elapsed_seconds=10.0, backoff_base_seconds=0.01, backoff_max_seconds=0.05)
NO_RETRY = RetryPolicy(max_attempts=1)


class SleepRecorder:
    """A RetryPolicy `sleep` that really sleeps (the elapsed-time bound reads the real clock) and keeps each delay."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        time.sleep(seconds)


def assert_key_hidden(exc: BaseException) -> None:
    """The key is in no rendering of the error: message, str, repr, or the full chained traceback."""
    rendered = [str(exc), repr(exc), str(getattr(exc, "message", "")), "".join(traceback.format_exception(exc))]
    assert not [text for text in rendered if TEST_API_KEY in text]


def raised(expected: type[E], call: Callable[[], object]) -> E:
    """The error `call` raises: exactly of type `expected`, and free of the API key."""
    with pytest.raises(expected) as info:
        call()
    assert type(info.value) is expected
    assert_key_hidden(info.value)
    return info.value


def total_requests(emulator: RivyaEmulator) -> int:
    return sum(emulator.stats()["requests"].values())


def create_text_only(client: RivyaClient, request: GenerationRequest = TEXT_ONLY, key: str | None = None) -> Any:
    return client.create_generation(request.api_body([]), idempotency_key=key or request.idempotency_key())


def submit(client: RivyaClient, request: GenerationRequest, client_request_id: str | None = None) -> GenerationTask:
    """What a caller does with a built request: upload each reference, then create with the request's own key."""
    uploads = [
        client.upload_file(ref.path, kind="image", mime_type=ref.mime_type, model=request.model)
        for ref in request.references
    ]
    return client.create_generation(
        request.api_body(uploads, client_request_id), idempotency_key=request.idempotency_key()
    )


def wait_until_terminal(client: RivyaClient, task_id: str, timeout_seconds: float = 10.0) -> GenerationTask:
    deadline = time.monotonic() + timeout_seconds
    while True:
        task = client.get_generation(task_id)
        if task.is_terminal or time.monotonic() > deadline:
            return task
        time.sleep(0.05)


@pytest.fixture
def accounts(configure_emulator: Callable[..., RivyaEmulator]) -> RivyaEmulator:
    """The test key plus a revoked, an expired, a read-only key and a second account."""
    return configure_emulator(
        api_keys=[
            ApiKeyConfig(key=TEST_API_KEY),
            ApiKeyConfig(key=REVOKED_KEY, status="revoked"),
            ApiKeyConfig(key=EXPIRED_KEY, status="expired"),
            ApiKeyConfig(key=READ_ONLY_KEY, scopes=["generations:read"]),
            ApiKeyConfig(key=OTHER_ACCOUNT_KEY, account="acct_other"),
        ]
    )


@pytest.fixture
def client(emulator: RivyaEmulator) -> Iterator[RivyaClient]:
    with RivyaClient(TEST_API_KEY, emulator.base_url, retry=FAST_RETRY, timeout_seconds=10) as rivya:
        yield rivya


# --- 1. every error code to its typed exception ---------------------------------------------------------


@dataclass(frozen=True)
class ErrorCase:
    """One way to make the emulator answer `code`: arrange it, then make the failing call with `key`."""

    code: str
    error: type[RivyaError]
    status: int
    retryable: bool = False
    key: str = TEST_API_KEY
    arrange: Callable[[RivyaEmulator, RivyaClient], object] = lambda emulator, client: None
    call: Callable[[RivyaClient], object] = RivyaClient.get_credits
    enveloped: bool = True


def faulting(**rule: Any) -> Callable[[RivyaEmulator, RivyaClient], None]:
    return lambda emulator, client: emulator.set_faults([FaultRule(**rule)])


ERROR_CASES = [
    ErrorCase(
        "validation_failed",
        ValidationFailed,
        400,
        call=lambda client: client.create_generation(UNSTRINGED_BODY, idempotency_key="raw-body"),
    ),
    ErrorCase("api_key_invalid", ApiKeyInvalid, 401, key="rvya_sk_nobody"),
    ErrorCase("api_key_revoked", ApiKeyRevoked, 401, key=REVOKED_KEY),
    ErrorCase("api_key_expired", ApiKeyExpired, 401, key=EXPIRED_KEY),
    ErrorCase("api_scope_denied", ScopeDenied, 403, key=READ_ONLY_KEY),
    ErrorCase("not_found", NotFound, 404, call=lambda client: client.get_generation("task_does_not_exist")),
    ErrorCase(
        "idempotency_conflict",
        IdempotencyConflict,
        409,
        arrange=lambda emulator, client: create_text_only(client),
        call=lambda client: create_text_only(client, CHANGED_PROMPT, key=TEXT_ONLY.idempotency_key()),
    ),
    ErrorCase(
        "insufficient_credits",
        InsufficientCredits,
        402,
        arrange=lambda emulator, client: emulator.set_credits(TEST_ACCOUNT, KLING_PRICE - 1),
        call=create_text_only,
    ),
    ErrorCase("rate_limited", RateLimited, 429, retryable=True, arrange=faulting(kind="rate_limited", retry_after=0)),
    ErrorCase(
        "public_api_disabled", PublicApiDisabled, 503, retryable=True, arrange=faulting(kind="public_api_disabled")
    ),
    ErrorCase("internal_error", ServerError, 500, retryable=True, arrange=faulting(kind="internal_error")),
    ErrorCase(
        "upstream_unavailable",
        UnknownApiError,
        503,
        retryable=True,
        arrange=faulting(kind="server_error", status=503, body="envelope"),
    ),
    ErrorCase(
        "http_502",
        ServerError,
        502,
        retryable=True,
        arrange=faulting(kind="server_error", body="html"),
        enveloped=False,
    ),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.code) for case in ERROR_CASES])
def test_error_code_maps_to_its_typed_exception(accounts: RivyaEmulator, case: ErrorCase) -> None:
    with (
        RivyaClient(TEST_API_KEY, accounts.base_url, retry=NO_RETRY) as owner,
        RivyaClient(case.key, accounts.base_url, retry=NO_RETRY) as caller,
    ):
        case.arrange(accounts, owner)
        error = raised(case.error, lambda: case.call(caller))
    assert (error.code, error.status, error.retryable) == (case.code, case.status, case.retryable)
    assert error.message
    if case.enveloped:
        assert error.request_id is not None and error.request_id.startswith("req_")
    else:  # a proxy's HTML page: no envelope, so no requestId, and the status decides
        assert error.request_id is None and error.message == "Bad Gateway"


def test_api_key_missing_maps_to_its_typed_exception(emulator: RivyaEmulator, client: RivyaClient) -> None:
    """The client refuses to exist without a key and always sends it to its own origin, so it cannot itself
    cause api_key_missing; its error mapping is applied to the emulator's real answer to a key-less request."""
    keyless = httpx.get(f"{emulator.base_url}/api/v1/credits")
    error = client._error_from(keyless)
    assert type(error) is ApiKeyMissing
    assert (error.code, error.status, error.retryable) == ("api_key_missing", 401, False)
    assert error.message and error.request_id is not None and error.request_id.startswith("req_")


def test_another_accounts_task_and_file_are_not_found(accounts: RivyaEmulator, client: RivyaClient) -> None:
    with RivyaClient(OTHER_ACCOUNT_KEY, accounts.base_url, retry=FAST_RETRY) as other:
        foreign_task = create_text_only(other)
        foreign_file = other.upload_file(REPO_PNG, kind="image", mime_type="image/png")
    for call in (lambda: client.get_generation(foreign_task.id), lambda: client.get_file(foreign_file.id)):
        error = raised(NotFound, call)
        assert (error.status, error.code) == (404, "not_found")


# --- 2. Retry-After -----------------------------------------------------------------------------------------


def test_retry_after_is_waited_before_the_retry(emulator: RivyaEmulator, client: RivyaClient) -> None:
    emulator.set_faults([FaultRule(endpoint="credits", kind="rate_limited", times=1, retry_after=1)])
    started = time.monotonic()
    assert client.get_credits() == TEST_CREDITS
    assert time.monotonic() - started >= 0.95  # the wait is the behaviour; 50 ms of clock tolerance
    assert emulator.stats()["requests"]["credits"] == 2


def test_retry_after_is_capped_by_the_policy(emulator: RivyaEmulator) -> None:
    emulator.set_faults([FaultRule(endpoint="credits", kind="rate_limited", times=1, retry_after=30)])
    sleeps = SleepRecorder()
    policy = RetryPolicy(max_attempts=2, retry_after_cap_seconds=0.2, sleep=sleeps)
    with RivyaClient(TEST_API_KEY, emulator.base_url, retry=policy) as capped:
        assert capped.get_credits() == TEST_CREDITS
    assert sleeps.delays == [0.2]
    assert emulator.stats()["requests"]["credits"] == 2


# --- 3./4. paid creates never cost twice --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "replays"),
    [
        pytest.param(
            FaultRule(endpoint="create_generation", kind="lost_response", times=1), 1, id="performed-answer-lost-as-500"
        ),
        pytest.param(
            FaultRule(endpoint="create_generation", kind="lost_response", times=1, lost_as="drop_connection"),
            1,
            id="performed-answer-lost-as-dropped-connection",
        ),
        pytest.param(
            FaultRule(endpoint="create_generation", kind="drop_connection", times=1), 0, id="dropped-before-performing"
        ),
    ],
)
def test_create_retried_after_a_lost_answer_charges_once(
    emulator: RivyaEmulator, client: RivyaClient, fault: FaultRule, replays: int
) -> None:
    emulator.set_faults([fault])
    task = create_text_only(client)
    stats = emulator.stats()
    assert stats["requests"]["create_generation"] == 2
    assert stats["creates_without_idempotency_key"] == 0
    # A replay happens only when the retry carried the first attempt's Idempotency-Key.
    assert (stats["creates_performed"], stats["idempotent_replays"]) == (1, replays)
    assert [(charge["task_id"], charge["credits"]) for charge in stats["charges"]] == [(task.id, KLING_PRICE)]
    assert stats["wallets"][TEST_ACCOUNT] == TEST_CREDITS - KLING_PRICE


def test_idempotency_conflict_is_raised_and_not_retried(emulator: RivyaEmulator, client: RivyaClient) -> None:
    original = create_text_only(client)
    conflict = raised(
        IdempotencyConflict, lambda: create_text_only(client, CHANGED_PROMPT, key=TEXT_ONLY.idempotency_key())
    )
    assert (conflict.status, conflict.retryable) == (409, False)
    stats = emulator.stats()
    assert stats["requests"]["create_generation"] == 2
    assert [charge["task_id"] for charge in stats["charges"]] == [original.id]


# --- 5./6./7. what is retried, and how far --------------------------------------------------------------------


@pytest.mark.parametrize("case", [pytest.param(case, id=case.code) for case in ERROR_CASES if not case.retryable])
def test_errors_that_retrying_cannot_change_are_sent_once(accounts: RivyaEmulator, case: ErrorCase) -> None:
    with (
        RivyaClient(TEST_API_KEY, accounts.base_url, retry=FAST_RETRY) as owner,
        RivyaClient(case.key, accounts.base_url, retry=FAST_RETRY) as caller,
    ):
        case.arrange(accounts, owner)
        before = total_requests(accounts)
        raised(case.error, lambda: case.call(caller))
    assert total_requests(accounts) - before == 1


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        pytest.param(FaultRule(endpoint="credits", kind="public_api_disabled"), PublicApiDisabled, id="503-disabled"),
        pytest.param(FaultRule(endpoint="credits", kind="server_error", status=503), ServerError, id="503-proxy-html"),
    ],
)
def test_persistent_server_errors_give_up_after_max_attempts(
    emulator: RivyaEmulator, fault: FaultRule, error: type[RivyaError]
) -> None:
    emulator.set_faults([fault])
    policy = RetryPolicy(max_attempts=3, backoff_base_seconds=0.01, backoff_max_seconds=0.02)
    with RivyaClient(TEST_API_KEY, emulator.base_url, retry=policy) as rivya:
        assert raised(error, rivya.get_credits).status == 503
    assert emulator.stats()["requests"]["credits"] == 3


def test_retries_stop_within_max_elapsed_seconds(emulator: RivyaEmulator) -> None:
    emulator.set_faults([FaultRule(endpoint="credits", kind="rate_limited", retry_after=1)])
    sleeps = SleepRecorder()
    policy = RetryPolicy(max_attempts=50, max_elapsed_seconds=0.5, retry_after_cap_seconds=0.2, sleep=sleeps)
    with RivyaClient(TEST_API_KEY, emulator.base_url, retry=policy) as rivya:
        raised(RateLimited, rivya.get_credits)
    attempts = emulator.stats()["requests"]["credits"]
    assert 2 <= attempts < policy.max_attempts
    assert attempts == len(sleeps.delays) + 1
    assert sum(sleeps.delays) <= policy.max_elapsed_seconds


def test_dropped_connections_on_reads_are_retried(emulator: RivyaEmulator, client: RivyaClient) -> None:
    task = create_text_only(client)
    emulator.set_faults([FaultRule(endpoint="get_generation", kind="drop_connection", times=2)])
    assert client.get_generation(task.id).id == task.id
    stats = emulator.stats()
    assert stats["requests"]["get_generation"] == 3
    assert stats["faults_injected"] == {"get_generation:drop_connection": 2}


def test_refused_connection_is_a_transport_error_after_retries() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    sleeps = SleepRecorder()
    policy = RetryPolicy(max_attempts=3, backoff_base_seconds=0.01, backoff_max_seconds=0.02, sleep=sleeps)
    with RivyaClient(TEST_API_KEY, f"http://127.0.0.1:{closed_port}", retry=policy) as nowhere:
        error = raised(TransportError, nowhere.get_credits)
    assert error.retryable and error.code == "transport_error" and "ConnectError" in error.message
    assert len(sleeps.delays) == policy.max_attempts - 1


def test_unknown_code_on_a_4xx_is_raised_without_retry(canned_api: CannedApi) -> None:
    canned_api.answer(418, {"error": {"code": "teapot_mode", "message": "I am a teapot.", "requestId": "req_1"}})
    with RivyaClient(TEST_API_KEY, canned_api.base_url, retry=FAST_RETRY) as rivya:
        error = raised(UnknownApiError, rivya.get_credits)
    assert (error.code, error.status, error.retryable, error.request_id) == ("teapot_mode", 418, False, "req_1")
    assert len(canned_api.paths) == 1


# --- 8. the key stays secret --------------------------------------------------------------------------------


def test_client_repr_and_logs_never_show_the_key(
    emulator: RivyaEmulator, client: RivyaClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.set_faults([FaultRule(endpoint="credits", kind="internal_error", times=1)])
    assert client.get_credits() == TEST_CREDITS
    raised(NotFound, lambda: client.get_generation("task_does_not_exist"))
    assert "retrying" in caplog.text  # the retry was logged, so the check below read real log lines
    assert TEST_API_KEY not in caplog.text
    assert TEST_API_KEY not in repr(client) and TEST_API_KEY not in str(client)


@pytest.mark.parametrize("bad_key", [f"{TEST_API_KEY}\n", f" {TEST_API_KEY}", "rvya_sk_tést", ""])
def test_key_that_cannot_be_sent_as_a_header_is_refused_at_construction(bad_key: str) -> None:
    """A stray newline from a secret file used to be retried as a transport error, echoing the key each time."""
    with pytest.raises(ValueError, match="api_key") as info:
        RivyaClient(bad_key, "http://127.0.0.1:9")
    assert TEST_API_KEY not in str(info.value)


def test_result_download_sends_no_authorization_to_the_media_host(
    configure_emulator: Callable[..., RivyaEmulator],
) -> None:
    """The fetcher owns a key-less pool; and even the client's own pool keeps the key to the API's origin."""
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0)
    with RivyaClient(TEST_API_KEY, emulator.base_url, retry=FAST_RETRY) as rivya:
        task = wait_until_terminal(rivya, create_text_only(rivya).id)
        url = task.result.video_url if task.result else None
        assert task.status == "succeeded" and url is not None and url.startswith(emulator.media_base_url)
        with MediaFetcher(allow_local=True) as fetcher, fetcher.open(url) as stream:
            assert stream.read()[4:8] == b"ftyp"
        assert rivya._http.get(url).status_code == 200
    stats = emulator.stats()
    assert (stats["media_requests"], stats["media_authorization_headers_seen"]) == (2, 0)
    # The counter can fail: a deliberate Bearer header is seen and refused.
    assert httpx.get(url, headers={"Authorization": f"Bearer {TEST_API_KEY}"}).status_code == 403
    assert emulator.stats()["media_authorization_headers_seen"] == 1


# --- 9. local validation: refused before any request ----------------------------------------------------------


def text_file_named_png(tmp_path: Path) -> list[Path]:
    path = tmp_path / "notes.png"
    path.write_text("not an image at all")
    return [path]


def gif_image(tmp_path: Path) -> list[Path]:
    path = tmp_path / "still.gif"
    path.write_bytes(encode_image("gif", "rgb8"))
    return [path]


def png_of_10_000_001_bytes(tmp_path: Path) -> list[Path]:
    """A real PNG signature, sparse-padded one byte over the limit: only the size rule can refuse it."""
    path = tmp_path / "huge.png"
    with path.open("wb") as handle:
        handle.write(REPO_PNG.read_bytes())
        handle.truncate(10_000_001)
    return [path]


def no_files(tmp_path: Path) -> list[Path]:
    return []


@pytest.mark.parametrize(
    ("build", "references", "field"),
    [
        pytest.param({"prompt": ""}, no_files, "prompt", id="empty-prompt"),
        pytest.param({"prompt": " \n\t "}, no_files, "prompt", id="whitespace-prompt"),
        pytest.param({"prompt": "a" * 2001}, no_files, "prompt", id="2001-chars"),
        pytest.param({"prompt": "é" * 2001}, no_files, "prompt", id="2001-multibyte-chars"),
        pytest.param({"params": {"duration": 2}}, no_files, "params.duration", id="duration-2"),
        pytest.param({"params": {"duration": 16}}, no_files, "params.duration", id="duration-16"),
        pytest.param({"params": {"duration": "5.5"}}, no_files, "params.duration", id="duration-5.5-text"),
        pytest.param({"params": {"duration": 5.0}}, no_files, "params.duration", id="duration-float"),
        pytest.param({"params": {"duration": True}}, no_files, "params.duration", id="duration-bool"),
        pytest.param({"params": {"aspect_ratio": "4:3"}}, no_files, "params.aspect_ratio", id="aspect-4:3"),
        pytest.param({"params": {"mode": "turbo"}}, no_files, "params.mode", id="mode-turbo"),
        pytest.param({"params": {"fps": "24"}}, no_files, "params.fps", id="unknown-param"),
        pytest.param({}, lambda tmp_path: [REPO_PNG] * 3, "references", id="three-references"),
        pytest.param({}, gif_image, "references[0]", id="gif-reference"),
        pytest.param({}, text_file_named_png, "references[0]", id="text-named-png"),
        pytest.param({}, png_of_10_000_001_bytes, "references[0]", id="10000001-bytes"),
    ],
)
def test_invalid_request_is_refused_before_any_request(
    emulator: RivyaEmulator,
    client: RivyaClient,
    tmp_path: Path,
    build: dict[str, Any],
    references: Callable[[Path], list[Path]],
    field: str,
) -> None:
    arguments = {"prompt": "a red fox running through fresh snow"} | build
    reference_paths = references(tmp_path)
    with pytest.raises(RequestValidationError) as info:
        submit(client, GenerationRequest.build(**arguments, reference_paths=reference_paths))
    assert info.value.field == field
    stats = emulator.stats()
    assert (stats["requests"], stats["media_requests"], stats["uploads_performed"]) == ({}, 0, 0)


def test_prompt_limit_counts_characters_not_bytes(emulator: RivyaEmulator, client: RivyaClient) -> None:
    """2000 emoji are 8000 UTF-8 bytes yet within the 2000-character limit, for the client and the strict emulator."""
    task = submit(client, GenerationRequest.build(prompt="🦊" * 2000))
    assert task.status == "queued" and emulator.stats()["creates_performed"] == 1


# --- 10. happy path -------------------------------------------------------------------------------------------


def test_image_to_video_end_to_end(configure_emulator: Callable[..., RivyaEmulator]) -> None:
    emulator = configure_emulator(time_scale=5)
    request = GenerationRequest.build(
        prompt="the product turns slowly on a marble table",
        params={"duration": 3, "sound": False, "aspect_ratio": "9:16", "mode": "std"},
        reference_paths=[REPO_PNG],
    )
    with RivyaClient(TEST_API_KEY, emulator.base_url, retry=FAST_RETRY) as rivya:
        kling = rivya.get_model("kling-3-0")
        assert kling is not None and kling.base_credits == KLING_PRICE
        assert request.params == {
            "mode": "std",
            "multi_shots": "false",
            "duration": "3",
            "sound": "false",
            "aspect_ratio": "9:16",
        }
        upload = rivya.upload_file(REPO_PNG, kind="image", mime_type="image/png", model="kling-3-0")
        assert isinstance(upload, FileObject) and upload.id.startswith("file_")
        assert (upload.kind, upload.mime_type, upload.size_bytes) == ("image", "image/png", REPO_PNG.stat().st_size)
        assert rivya.get_file(upload.id) == upload
        created = rivya.create_generation(
            request.api_body([upload], "brief-42"), idempotency_key=request.idempotency_key()
        )
        assert (created.status, created.reserved_credits, created.final_credits) == ("queued", KLING_PRICE, 0)
        assert rivya.get_credits() == TEST_CREDITS - KLING_PRICE
        finished = wait_until_terminal(rivya, created.id)
    assert (finished.id, finished.status, finished.final_credits) == (created.id, "succeeded", KLING_PRICE)
    assert finished.result is not None and finished.result.video_url is not None
    assert finished.result.video_url.startswith(emulator.media_base_url)
    assert emulator.stats()["creates_performed"] == 1


# --- 11. tolerance: any 2xx, unknown fields -------------------------------------------------------------------


class CannedApi:
    """A stand-in API on 127.0.0.1 that answers every request with one canned (status, JSON body): what a later
    Rivya might send (200 instead of 202, new fields) or a code this client has never seen."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._status, self._body = 200, b"{}"
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                canned.paths.append(self.path)
                self.send_response(canned._status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(canned._body)))
                self.end_headers()
                self.wfile.write(canned._body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                """Silence the per-request stderr line."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def answer(self, status: int, body: dict[str, Any]) -> None:
        self._status, self._body = status, json.dumps(body).encode()

    def __enter__(self) -> CannedApi:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def canned_api() -> Iterator[CannedApi]:
    with CannedApi() as api:
        yield api


def test_any_2xx_and_unknown_fields_are_accepted(canned_api: CannedApi) -> None:
    canned_api.answer(
        200,
        {
            "id": "task_1",
            "status": "queued",
            "model": "kling-3-0",
            "reserved_credits": 90,
            "final_credits": 0,
            "created_at": "2026-05-11T00:00:00.000Z",
            "updated_at": "2026-05-11T00:00:00.000Z",
            "result": None,
            "error": None,
            "queue_position": 3,
        },
    )
    with RivyaClient(TEST_API_KEY, canned_api.base_url, retry=NO_RETRY) as rivya:
        task = create_text_only(rivya)
    assert (task.id, task.status, task.reserved_credits) == ("task_1", "queued", 90)
    assert task.model_extra == {"queue_position": 3}
    assert canned_api.paths == ["/api/v1/generations"]


def test_emulator_answers_with_extra_fields_are_kept(emulator: RivyaEmulator, client: RivyaClient) -> None:
    """The real catalog carries fields the client does not model (runtime, requires_files_api, ...): kept, not fatal."""
    kling = client.get_model("kling-3-0")
    assert kling is not None and kling.model_extra is not None
    assert kling.model_extra["requires_files_api"] is True and "supported_modes" in kling.model_extra
