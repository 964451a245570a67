"""The emulator against the contract (docs/rivya-api.md), over real HTTP with raw httpx — never the
project's client, so these tests pin what Rivya does rather than what our client expects."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from fractions import Fraction
from typing import Any, TypeVar

import av
import httpx
import pydantic
import pytest

from rivya_pipeline.emulator import FAIL_MARKER, ApiKeyConfig, EmulatorConfig, FaultRule, RivyaEmulator
from rivya_pipeline.emulator.cli import build_parser, config_from_args
from rivya_pipeline.emulator.video import encode_mp4, free_box_header
from rivya_pipeline_tests.fixtures_emulator import TEST_ACCOUNT, TEST_API_KEY, TEST_CREDITS
from rivya_pipeline_tests.helpers import KLING_PRICE

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
OTHER_KEY = "rvya_sk_other_account"
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
Result = TypeVar("Result")


def encode_image(codec: str, pix_fmt: str) -> bytes:
    """A real 16x16 still in the given codec (png, mjpeg, gif, libwebp), made with PyAV."""
    context = av.CodecContext.create(codec, "w")
    context.width, context.height, context.pix_fmt, context.time_base = 16, 16, pix_fmt, Fraction(1, 1)
    frame = av.VideoFrame(16, 16, "rgb24").reformat(format=pix_fmt)
    return b"".join(bytes(packet) for packet in context.encode(frame) + context.encode(None))


PNG = encode_image("png", "rgb24")


@pytest.fixture
def api(emulator: RivyaEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, headers=AUTH, timeout=10) as client:
        yield client


def two_accounts(configure_emulator: Any) -> RivyaEmulator:
    return configure_emulator(api_keys=[ApiKeyConfig(key=TEST_API_KEY), ApiKeyConfig(key=OTHER_KEY, account="acct_b")])


def create(api: httpx.Client, body: Any = None, key: str | None = "key-1") -> httpx.Response:
    """POST /generations (a kling-3-0 text-to-video by default) with an Idempotency-Key unless key is None."""
    headers = {"Idempotency-Key": key} if key is not None else {}
    return api.post("/api/v1/generations", json=body or {"model": "kling-3-0", "prompt": "a cat"}, headers=headers)


def upload(
    api: httpx.Client, content: bytes = PNG, name: str = "ref.png", kind: str = "image", **fields: str
) -> httpx.Response:
    files = {"file": (name, content, "image/png")}
    return api.post("/api/v1/files", files=files, data={"kind": kind} | fields)


def error_code(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["requestId"].startswith("req_") and error["message"]
    return error["code"]


def wait_terminal(api: httpx.Client, task_id: str) -> dict[str, Any]:
    for _ in range(500):
        task = api.get(f"/api/v1/generations/{task_id}").json()
        if task["status"] in ("succeeded", "failed"):
            return task
        time.sleep(0.02)
    raise AssertionError(f"{task_id} never finished")


def probe(content: bytes) -> tuple[float, int, int]:
    with av.open(io.BytesIO(content)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        assert frames > 0
        return container.duration / 1_000_000, stream.width, stream.height


# --- catalog, auth, ownership -------------------------------------------------------------------------


def test_models_are_public_and_kling_matches_the_contract(emulator: RivyaEmulator) -> None:
    response = httpx.get(f"{emulator.base_url}/api/v1/models")
    assert response.status_code == 200 and response.json()["object"] == "list"
    models = {model["id"]: model for model in response.json()["data"]}
    kling = models["kling-3-0"]
    assert (kling["base_credits"], kling["billing_type"], kling["max_prompt_length"]) == (90, "FIXED", 2000)
    assert kling["category"] == "video" and kling["api_status"] == "available" and kling["requires_files_api"]
    params = {param["key"]: param for param in kling["params"]}
    assert {key: params[key]["default"] for key in params} == {
        "mode": "pro",
        "multi_shots": "false",
        "duration": "5",
        "sound": "false",
        "aspect_ratio": "16:9",
    }
    assert params["duration"]["options"] == [str(seconds) for seconds in range(3, 16)]
    assert all(
        param["type"] == "select" and set(param) >= {"required", "options", "min", "max", "step"}
        for param in params.values()
    )
    assert "aspectRatio" in {param["key"] for param in models["veo3-1-fast"]["params"]}
    assert models["veo3-1-fast"]["base_credits"] != 90
    assert models["sora-2"]["api_status"] == "coming_soon"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, "api_key_missing"),
        ({"Authorization": "Bearer"}, "api_key_missing"),
        ({"Authorization": "Bearer rvya_sk_nobody"}, "api_key_invalid"),
        ({"Authorization": f"Basic {TEST_API_KEY}"}, "api_key_invalid"),
        ({"Authorization": "Bearer rvya_sk_revoked"}, "api_key_revoked"),
        ({"Authorization": "Bearer rvya_sk_expired"}, "api_key_expired"),
    ],
)
def test_auth_errors(configure_emulator: Any, headers: dict[str, str], expected: str) -> None:
    emulator = configure_emulator(
        api_keys=[
            ApiKeyConfig(key=TEST_API_KEY),
            ApiKeyConfig(key="rvya_sk_revoked", status="revoked"),
            ApiKeyConfig(key="rvya_sk_expired", status="expired"),
        ]
    )
    assert error_code(httpx.get(f"{emulator.base_url}/api/v1/credits", headers=headers), 401) == expected


def test_missing_scope_is_403(configure_emulator: Any) -> None:
    emulator = configure_emulator(api_keys=[ApiKeyConfig(key=TEST_API_KEY, scopes=["generations:read"])])
    with httpx.Client(base_url=emulator.base_url, headers=AUTH) as api:
        assert error_code(create(api), 403) == "api_scope_denied"
        assert error_code(api.get("/api/v1/credits"), 403) == "api_scope_denied"
        assert emulator.stats()["creates_performed"] == 0


def test_another_accounts_task_and_file_are_not_found(configure_emulator: Any, api: httpx.Client) -> None:
    emulator = two_accounts(configure_emulator)
    task_id, file_id = create(api).json()["id"], upload(api).json()["id"]
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    for path in (f"/api/v1/generations/{task_id}", f"/api/v1/files/{file_id}", "/api/v1/generations/task_nope"):
        assert error_code(httpx.get(emulator.base_url + path, headers=other), 404) == "not_found"
    assert api.get(f"/api/v1/files/{file_id}").status_code == 200
    assert error_code(api.get("/api/v1/no-such-route"), 404) == "not_found"


# --- strict request rules -----------------------------------------------------------------------------


def kling(**params: Any) -> dict[str, Any]:
    return {"model": "kling-3-0", "prompt": "a cat", "params": params}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(kling(duration=5), id="duration-as-number"),
        pytest.param(kling(sound=False), id="flag-as-boolean"),
        pytest.param(kling(duration="16"), id="option-out-of-range"),
        pytest.param(kling(aspect_ratio="4:3"), id="unknown-option"),
        pytest.param(kling(fps="24"), id="unknown-param"),
        pytest.param(kling(aspectRatio="9:16"), id="other-models-param-name"),
        pytest.param(kling() | {"files": ["file_1"]}, id="top-level-files"),
        pytest.param(kling() | {"negative_prompt": "dogs"}, id="unknown-top-level-field"),
        pytest.param({"model": "kling-3-0", "params": {}}, id="missing-prompt"),
        pytest.param({"model": "kling-3-0", "prompt": "   "}, id="blank-prompt"),
        pytest.param({"model": "kling-3-0", "prompt": "é" * 2001}, id="prompt-2001-multibyte-chars"),
        pytest.param({"model": "kling-9", "prompt": "a cat"}, id="unknown-model"),
        pytest.param({"model": "sora-2", "prompt": "a cat"}, id="coming-soon-model"),
        pytest.param({"model": "veo3-1-fast", "prompt": "a cat", "params": {"seed": "7"}}, id="number-as-string"),
        pytest.param(kling() | {"client_request_id": "x" * 129}, id="client-request-id-too-long"),
        pytest.param(kling(referenceMediaItems={"url": "x"}), id="references-not-a-list"),
        pytest.param(kling() | {"params": []}, id="params-not-an-object"),
        pytest.param(["kling-3-0"], id="body-not-an-object"),
    ],
)
def test_invalid_creates_are_rejected_without_charge(api: httpx.Client, emulator: RivyaEmulator, body: Any) -> None:
    assert error_code(create(api, body), 400) == "validation_failed"
    stats = emulator.stats()
    assert stats["creates_performed"] == 0 and stats["wallets"][TEST_ACCOUNT] == TEST_CREDITS


def test_prompt_limit_counts_characters_not_bytes(api: httpx.Client) -> None:
    assert create(api, {"model": "kling-3-0", "prompt": "é" * 2000}, key="a").status_code == 202
    assert create(api, {"model": "kling-3-0", "prompt": "🎬" * 2000}, key="b").status_code == 202
    assert error_code(create(api, {"model": "kling-3-0", "prompt": "🎬" * 2001}, key="c"), 400) == "validation_failed"


def test_valid_params_of_each_model_are_accepted(api: httpx.Client) -> None:
    full = kling(mode="std", multi_shots="true", duration="15", sound="true", aspect_ratio="1:1")
    assert create(api, full, key="kling").status_code == 202
    veo = {"model": "veo3-1-fast", "prompt": "a cat", "params": {"aspectRatio": "9:16", "seed": 42}}
    response = create(api, veo, key="veo")
    assert response.status_code == 202 and response.json()["reserved_credits"] == 60


def test_body_must_be_json(api: httpx.Client) -> None:
    as_form = api.post("/api/v1/generations", data={"model": "kling-3-0", "prompt": "a cat"})
    assert error_code(as_form, 400) == "validation_failed"
    broken = api.post("/api/v1/generations", content=b"{", headers={"Content-Type": "application/json"})
    assert error_code(broken, 400) == "validation_failed"


# --- files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "pix_fmt", "mime_type"),
    [("png", "rgb24", "image/png"), ("mjpeg", "yuvj420p", "image/jpeg"), ("libwebp", "yuv420p", "image/webp")],
)
def test_image_upload_is_typed_by_magic_bytes(
    api: httpx.Client, emulator: RivyaEmulator, codec: str, pix_fmt: str, mime_type: str
) -> None:
    content = encode_image(codec, pix_fmt)
    response = upload(api, content, name="whatever.bin", model="kling-3-0", client_request_id="brief-1")
    assert response.status_code == 201, response.text
    stored = response.json()
    assert stored["id"].startswith("file_") and stored["object"] == "file" and stored["kind"] == "image"
    assert (stored["mime_type"], stored["size_bytes"], stored["name"]) == (mime_type, len(content), "whatever.bin")
    assert stored["duration_token"] is None and TIMESTAMP.match(stored["created_at"])
    assert stored["url"].startswith(emulator.media_base_url)
    assert api.get(f"/api/v1/files/{stored['id']}").json() == stored
    assert httpx.get(stored["url"]).content == content
    assert emulator.stats()["uploads_performed"] == 1


def test_video_upload_reports_duration_and_token(api: httpx.Client) -> None:
    response = upload(api, encode_mp4(3, "16:9", 8), name="clip.mp4", kind="video")
    assert response.status_code == 201, response.text
    stored = response.json()
    assert stored["mime_type"] == "video/mp4" and stored["duration_seconds"] == pytest.approx(3, abs=0.5)
    assert stored["duration_token"]


@pytest.mark.parametrize(
    ("content", "kind", "fields"),
    [
        pytest.param(b"just some text, not an image", "image", {}, id="text-named-png"),
        pytest.param(encode_image("gif", "rgb8"), "image", {"model": "kling-3-0"}, id="gif-for-kling"),
        pytest.param(PNG, "video", {}, id="png-declared-as-video"),
        pytest.param(encode_mp4(3, "16:9", 8), "video", {"model": "kling-3-0"}, id="video-for-kling"),
        pytest.param(PNG, "document", {}, id="unknown-kind"),
        pytest.param(PNG, "image", {"model": "kling-9"}, id="unknown-model"),
        pytest.param(PNG, "image", {"purpose": "reference"}, id="unknown-field"),
        pytest.param(b"", "image", {}, id="empty-file"),
        pytest.param(b"\x00\x00\x00\x18ftypmp42" + bytes(64), "video", {}, id="mp4-signature-but-no-video"),
    ],
)
def test_invalid_uploads_are_rejected(
    api: httpx.Client, emulator: RivyaEmulator, content: bytes, kind: str, fields: dict[str, str]
) -> None:
    assert error_code(upload(api, content, kind=kind, **fields), 400) == "validation_failed"
    assert emulator.stats()["uploads_performed"] == 0


def test_image_size_limit_is_ten_million_bytes(api: httpx.Client) -> None:
    at_limit = PNG + bytes(10_000_000 - len(PNG))
    assert upload(api, at_limit).json()["size_bytes"] == 10_000_000
    assert error_code(upload(api, at_limit + b"\x00"), 400) == "validation_failed"


# --- reference media -----------------------------------------------------------------------------------


def reference(stored: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return {"url": stored["url"], "kind": "image", "name": stored["name"], "mimeType": stored["mime_type"]} | overrides


def test_uploaded_images_are_accepted_as_references(api: httpx.Client) -> None:
    first, second = upload(api).json(), upload(api).json()
    response = create(api, kling(referenceMediaItems=[reference(first), reference(second)]))
    assert response.status_code == 202, response.text


def test_invalid_references_are_rejected(configure_emulator: Any, api: httpx.Client) -> None:
    emulator = two_accounts(configure_emulator)
    mine = upload(api).json()
    with httpx.Client(base_url=emulator.base_url, headers={"Authorization": f"Bearer {OTHER_KEY}"}) as other:
        theirs = upload(other).json()
    invalid = {
        "three-items": [reference(mine)] * 3,
        "other-accounts-file": [reference(theirs)],
        "unknown-url": [reference(mine, url="https://example.com/cat.png")],
        "missing-url": [{"kind": "image"}],
        "snake-case-key": [reference(mine, duration_token=None)],
        "wrong-kind": [reference(mine, kind="video")],
        "wrong-mime": [reference(mine, mimeType="image/jpeg")],
    }
    for case, items in invalid.items():
        assert error_code(create(api, kling(referenceMediaItems=items), key=case), 400) == "validation_failed", case
    assert emulator.stats()["creates_performed"] == 0


# --- idempotency ---------------------------------------------------------------------------------------


def test_same_key_same_body_returns_the_original_task_without_charge(
    api: httpx.Client, emulator: RivyaEmulator
) -> None:
    first = create(api, kling(duration="3", mode="std"))
    again = create(api, {"params": {"mode": "std", "duration": "3"}, "prompt": "a cat", "model": "kling-3-0"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["status"] == "queued"
    assert again.headers["Idempotent-Replayed"] == "true"
    stats = emulator.stats()
    assert (stats["creates_performed"], stats["idempotent_replays"], len(stats["charges"])) == (1, 1, 1)
    assert api.get("/api/v1/credits").json() == {"current_credits": TEST_CREDITS - KLING_PRICE}


def test_same_key_different_body_is_a_conflict(api: httpx.Client, emulator: RivyaEmulator) -> None:
    create(api, kling(duration="3"))
    assert error_code(create(api, kling(duration="4")), 409) == "idempotency_conflict"
    assert emulator.stats()["creates_performed"] == 1


def test_rejected_request_does_not_store_its_key(api: httpx.Client, emulator: RivyaEmulator) -> None:
    assert error_code(create(api, kling(duration=3)), 400) == "validation_failed"
    emulator.set_credits(TEST_ACCOUNT, KLING_PRICE - 1)
    assert error_code(create(api, kling(duration="3")), 402) == "insufficient_credits"
    emulator.set_credits(TEST_ACCOUNT, KLING_PRICE)
    assert create(api, kling(duration="4")).status_code == 202


def test_keys_are_scoped_per_account_and_expire(configure_emulator: Any, api: httpx.Client) -> None:
    emulator = two_accounts(configure_emulator)
    with httpx.Client(base_url=emulator.base_url, headers={"Authorization": f"Bearer {OTHER_KEY}"}) as other:
        assert create(api).json()["id"] != create(other).json()["id"]
    emulator = configure_emulator(idempotency_ttl_seconds=60, time_scale=6000)  # 60 emulated s = 10 ms
    first = create(api).json()["id"]
    time.sleep(0.05)
    assert create(api).json()["id"] != first


def test_concurrent_retries_with_one_key_create_one_task(api: httpx.Client, emulator: RivyaEmulator) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = set(pool.map(lambda _: create(api).json()["id"], range(16)))
    assert len(ids) == 1 and emulator.stats()["creates_performed"] == 1


def test_creates_without_key_are_allowed_and_counted(api: httpx.Client, emulator: RivyaEmulator) -> None:
    assert create(api, key=None).status_code == create(api, key=None).status_code == 202
    stats = emulator.stats()
    assert stats["creates_without_idempotency_key"] == 2 and stats["creates_performed"] == 2


# --- wallet and lifecycle ------------------------------------------------------------------------------


def test_success_keeps_the_reservation_as_final_credits(configure_emulator: Any, api: httpx.Client) -> None:
    emulator = configure_emulator(queued_seconds=0.3, processing_seconds=0.8)
    task = create(api).json()
    assert task["id"].startswith("task_") and TIMESTAMP.match(task["created_at"])
    assert (task["status"], task["reserved_credits"], task["final_credits"]) == ("queued", KLING_PRICE, 0)
    assert api.get("/api/v1/credits").json()["current_credits"] == TEST_CREDITS - KLING_PRICE
    seen = [task["status"]]
    while seen[-1] != "succeeded":
        time.sleep(0.02)
        status = api.get(f"/api/v1/generations/{task['id']}").json()["status"]
        if status != seen[-1]:
            seen.append(status)
    assert seen == ["queued", "processing", "succeeded"]
    done = api.get(f"/api/v1/generations/{task['id']}").json()
    assert done["final_credits"] == KLING_PRICE and done["error"] is None and TIMESTAMP.match(done["updated_at"])
    assert done["result"]["urls"] == [done["result"]["primary_url"]]
    assert done["result"]["primary_url"].startswith(emulator.media_base_url + "/")
    assert api.get("/api/v1/credits").json()["current_credits"] == TEST_CREDITS - KLING_PRICE
    assert emulator.stats()["polls"][task["id"]] >= 3


def test_fail_marker_fails_and_refunds(api: httpx.Client, emulator: RivyaEmulator) -> None:
    task = create(api, {"model": "kling-3-0", "prompt": f"a cat {FAIL_MARKER}"}).json()
    failed = wait_terminal(api, task["id"])
    assert failed["status"] == "failed" and failed["result"] is None and failed["final_credits"] == 0
    assert failed["error"]["code"] == "generation_failed" and failed["error"]["message"]
    assert api.get("/api/v1/credits").json()["current_credits"] == TEST_CREDITS
    assert emulator.stats()["charges"] == [
        {"task_id": task["id"], "account": TEST_ACCOUNT, "credits": KLING_PRICE, "refunded": True}
    ]


def test_time_scale_compresses_emulated_time(configure_emulator: Any, api: httpx.Client) -> None:
    configure_emulator(queued_seconds=60, processing_seconds=240, time_scale=1000)
    task = wait_terminal(api, create(api).json()["id"])
    elapsed = (datetime.fromisoformat(task["updated_at"]) - datetime.fromisoformat(task["created_at"])).total_seconds()
    assert elapsed == pytest.approx(0.3, abs=0.002)  # (60 + 240) emulated s at 1000x, on the emulator's clock


def test_failure_rate_is_seeded(configure_emulator: Any, api: httpx.Client) -> None:
    def outcomes() -> list[str]:
        configure_emulator(failure_rate=0.5, seed=7, queued_seconds=0, processing_seconds=0)
        ids = [create(api, key=f"k{index}").json()["id"] for index in range(12)]
        return [api.get(f"/api/v1/generations/{task_id}").json()["status"] for task_id in ids]

    first = outcomes()
    assert first == outcomes() and {"failed", "succeeded"} == set(first)


def test_insufficient_credits_and_concurrent_creates_never_overdraw(api: httpx.Client, emulator: RivyaEmulator) -> None:
    emulator.set_credits(TEST_ACCOUNT, KLING_PRICE * 5)
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(pool.map(lambda index: create(api, key=f"k{index}").status_code, range(12)))
    assert statuses == [202] * 5 + [402] * 7
    stats = emulator.stats()
    assert stats["wallets"][TEST_ACCOUNT] == 0 and stats["creates_performed"] == 5
    assert error_code(create(api, key="late"), 402) == "insufficient_credits"


# --- result media --------------------------------------------------------------------------------------


def finished_video_url(api: httpx.Client, body: dict[str, Any] | None = None) -> str:
    task = wait_terminal(api, create(api, body).json()["id"])
    assert task["status"] == "succeeded"
    return task["result"]["primary_url"]


@pytest.mark.parametrize(
    ("body", "duration", "size"),
    [
        pytest.param(None, 5, (1280, 720), id="kling-defaults"),
        pytest.param(kling(duration="3", aspect_ratio="9:16"), 3, (720, 1280), id="kling-3s-portrait"),
        pytest.param(kling(duration="7", aspect_ratio="1:1", mode="std"), 7, (480, 480), id="kling-7s-square-std"),
        pytest.param(
            {"model": "veo3-1-fast", "prompt": "a cat", "params": {"aspectRatio": "9:16", "duration": "4"}},
            4,
            (480, 854),
            id="veo-param-names",
        ),
    ],
)
def test_result_is_a_real_mp4_of_the_requested_shape(
    configure_emulator: Any, api: httpx.Client, body: Any, duration: int, size: tuple[int, int]
) -> None:
    configure_emulator(queued_seconds=0, processing_seconds=0)
    response = httpx.get(finished_video_url(api, body))
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    seconds, width, height = probe(response.content)
    assert seconds == pytest.approx(duration, abs=0.5) and (width, height) == size


def test_padded_result_has_the_exact_size_and_still_decodes(configure_emulator: Any, api: httpx.Client) -> None:
    configure_emulator(queued_seconds=0, processing_seconds=0, result_min_bytes=3_000_000)
    with httpx.stream("GET", finished_video_url(api, kling(duration="3"))) as response:
        assert response.headers["content-length"] == "3000000"
        content = response.read()
    assert len(content) == 3_000_000 and probe(content)[0] == pytest.approx(3, abs=0.5)
    assert free_box_header(5 * 2**30) == b"\x00\x00\x00\x01free" + (5 * 2**30).to_bytes(8, "big")


def test_unfinished_or_unknown_results_are_not_served(api: httpx.Client, emulator: RivyaEmulator) -> None:
    task = create(api).json()
    assert httpx.get(f"{emulator.media_base_url}/media/{task['id']}.mp4").status_code == 404
    assert httpx.get(f"{emulator.media_base_url}/media/task_nope.mp4").status_code == 404


def test_media_host_records_and_rejects_authorization(configure_emulator: Any, api: httpx.Client) -> None:
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0)
    url = finished_video_url(api)
    assert httpx.get(url, headers=AUTH).status_code == 403
    assert httpx.get(url).status_code == 200
    stats = emulator.stats()
    assert stats["media_requests"] == 2 and stats["media_authorization_headers_seen"] == 1
    assert stats["media_authorized_paths"] == [httpx.URL(url).path]
    assert TEST_API_KEY not in json.dumps(stats)


def test_media_host_can_accept_authorization_or_redirect(configure_emulator: Any, api: httpx.Client) -> None:
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0, reject_authorized_media=False)
    url = finished_video_url(api)
    assert httpx.get(url, headers=AUTH).status_code == 200
    assert emulator.stats()["media_authorization_headers_seen"] == 1
    emulator.reset(emulator.config.model_copy(update={"media_redirect_to": "http://169.254.169.254/latest"}))
    url = finished_video_url(api)
    redirect = httpx.get(url)
    assert (redirect.status_code, redirect.headers["location"]) == (302, "http://169.254.169.254/latest")


# --- faults --------------------------------------------------------------------------------------------


def test_rate_limited_sends_retry_after_then_recovers(api: httpx.Client, emulator: RivyaEmulator) -> None:
    emulator.set_faults([FaultRule(endpoint="create_generation", kind="rate_limited", times=2, retry_after=3)])
    for _ in range(2):
        limited = create(api)
        assert error_code(limited, 429) == "rate_limited" and limited.headers["Retry-After"] == "3"
    assert create(api).status_code == 202
    stats = emulator.stats()
    assert stats["creates_performed"] == 1 and stats["faults_injected"] == {"create_generation:rate_limited": 2}


@pytest.mark.parametrize(
    ("rule", "status", "code"),
    [
        (FaultRule(kind="internal_error"), 500, "internal_error"),
        (FaultRule(kind="public_api_disabled"), 503, "public_api_disabled"),
        (FaultRule(kind="server_error", status=503, body="envelope"), 503, "upstream_unavailable"),
    ],
)
def test_enveloped_server_faults(
    api: httpx.Client, emulator: RivyaEmulator, rule: FaultRule, status: int, code: str
) -> None:
    emulator.set_faults([rule])
    assert error_code(api.get("/api/v1/credits"), status) == code


def test_server_error_as_a_proxy_would_send_it(api: httpx.Client, emulator: RivyaEmulator) -> None:
    emulator.set_faults(
        [
            FaultRule(endpoint="get_generation", kind="server_error", times=1),
            FaultRule(endpoint="get_generation", kind="server_error", status=504, body="empty"),
        ]
    )
    html = api.get("/api/v1/generations/task_x")
    assert html.status_code == 502 and html.headers["content-type"].startswith("text/html")
    assert "Bad Gateway" in html.text
    empty = api.get("/api/v1/generations/task_x")
    assert (empty.status_code, empty.content) == (504, b"")
    assert api.get("/api/v1/credits").status_code == 200  # rules match their endpoint only


@pytest.mark.parametrize("endpoint", ["models", "media"])
def test_drop_connection_is_a_transport_error(api: httpx.Client, emulator: RivyaEmulator, endpoint: str) -> None:
    emulator.set_faults([FaultRule(endpoint=endpoint, kind="drop_connection", times=1)])
    url = f"{emulator.base_url}/api/v1/models" if endpoint == "models" else f"{emulator.media_base_url}/files/x"
    with pytest.raises(httpx.TransportError):
        httpx.get(url)
    assert httpx.get(url).status_code in (200, 404)


@pytest.mark.parametrize("lost_as", ["internal_error", "drop_connection"])
def test_lost_response_charges_and_the_retry_finds_the_task(
    api: httpx.Client, emulator: RivyaEmulator, lost_as: str
) -> None:
    emulator.set_faults([FaultRule(endpoint="create_generation", kind="lost_response", times=1, lost_as=lost_as)])
    if lost_as == "internal_error":
        assert error_code(create(api), 500) == "internal_error"
    else:
        with pytest.raises(httpx.TransportError):
            create(api)
    stats = emulator.stats()
    assert stats["creates_performed"] == 1 and stats["wallets"][TEST_ACCOUNT] == TEST_CREDITS - KLING_PRICE
    retry = create(api)
    assert retry.status_code == 202 and retry.json()["id"] == stats["charges"][0]["task_id"]
    assert len(emulator.stats()["charges"]) == 1


def test_stalled_lost_response_is_charged_while_the_client_still_waits(
    api: httpx.Client, emulator: RivyaEmulator
) -> None:
    emulator.set_faults(
        [FaultRule(endpoint="create_generation", kind="lost_response", times=1, lost_as="stall", delay=0.5)]
    )
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(create, api)
        while emulator.stats()["creates_performed"] == 0:
            assert not waiting.done(), "the create answered before it was performed"
            time.sleep(0.01)
        assert not waiting.done()  # performed and charged, and the client has not heard
        with pytest.raises(httpx.TransportError):
            waiting.result()
    assert time.monotonic() - started >= 0.5
    task_id = emulator.stats()["charges"][0]["task_id"]
    assert create(api).json()["id"] == task_id
    assert len(emulator.stats()["charges"]) == 1


def test_trickle_paces_one_media_body_and_served_bytes_are_counted(configure_emulator: Any, api: httpx.Client) -> None:
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0, result_min_bytes=1_000_000)
    url = finished_video_url(api, kling(duration="3"))
    emulator.set_faults([FaultRule(endpoint="media", kind="trickle", bytes_per_second=2_000_000, times=1)])
    started = time.monotonic()
    with httpx.stream("GET", url) as response:
        received = sum(len(piece) for piece in response.iter_raw())
    assert time.monotonic() - started >= 0.5  # 1 MB at 2 MB/s
    assert received == 1_000_000
    assert emulator.stats()["media_bytes_served"] == 1_000_000
    assert len(httpx.get(url).content) == 1_000_000  # the rule fired once: the next body is not paced
    assert emulator.stats()["media_bytes_served"] == 2_000_000
    with pytest.raises(pydantic.ValidationError):
        FaultRule(endpoint="get_generation", kind="trickle")


def test_slow_and_latency_delay_the_answer(configure_emulator: Any, api: httpx.Client) -> None:
    emulator = configure_emulator(latency_seconds=0.2)
    emulator.set_faults([FaultRule(endpoint="credits", kind="slow", delay=0.3)])
    started = time.monotonic()
    assert api.get("/api/v1/credits").status_code == 200
    assert time.monotonic() - started >= 0.5


def test_rate_faults_are_seeded_and_scripted_faults_fire_exactly_n_times(
    configure_emulator: Any, api: httpx.Client
) -> None:
    def pattern() -> list[int]:
        configure_emulator(seed=3, faults=[FaultRule(endpoint="*", kind="internal_error", rate=0.5)])
        return [api.get("/api/v1/credits").status_code for _ in range(16)]

    first = pattern()
    assert first == pattern() and set(first) == {200, 500}
    emulator = configure_emulator(faults=[FaultRule(kind="rate_limited", times=5, retry_after=0)])
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda _: api.get("/api/v1/credits").status_code, range(20)))
    assert statuses.count(429) == 5 and emulator.stats()["faults_injected"] == {"credits:rate_limited": 5}


def test_lost_response_is_only_for_creates() -> None:
    with pytest.raises(pydantic.ValidationError):
        FaultRule(endpoint="get_generation", kind="lost_response")


# --- outages: `for_seconds` windows on the emulator clock ------------------------------------------------


def outage_window(emulator: RivyaEmulator) -> dict[str, Any]:
    """The window of the one `for_seconds` rule installed, as the stats show it (emulated seconds)."""
    (window,) = emulator.stats()["fault_windows"]
    return window


def eventually(condition: Callable[[], bool], what: str) -> None:
    """Polls `condition` for at most 20 s of real time: a bound against hanging, never a threshold asserted."""
    for _ in range(2000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"{what} never happened")


def during_outage(emulator: RivyaEmulator, send: Callable[[], Result]) -> list[Result]:
    """Calls `send` (whose first request opens the window) in rounds until the window has closed, and returns
    the rounds after which it was still open: every request of those rounds fell inside the window, however
    slowly the machine ran. The round that straddles the close is left out, being undecidable."""
    inside: list[Result] = []
    for _ in range(2000):
        result = send()
        state = outage_window(emulator)["state"]
        assert state != "pending", "send() made no request that the outage rule matches"
        if state == "closed":
            assert inside, "not one round of requests fitted in the window: lower the test's time_scale"
            return inside
        inside.append(result)
        time.sleep(0.005)
    raise AssertionError("the outage window never closed")


def test_media_host_down_503_for_three_emulated_minutes_then_serves_the_video(
    configure_emulator: Any, api: httpx.Client
) -> None:
    """Models a CDN outage: the media host answers 503 for 180 emulated seconds from its first request
    (0.5 s of real time at time_scale 360) while the API keeps answering, then serves the video again."""
    emulator = configure_emulator(time_scale=360, queued_seconds=0, processing_seconds=0)
    url = finished_video_url(api)
    emulator.set_faults([FaultRule(endpoint="media", kind="server_error", status=503, for_seconds=180)])
    media_statuses: list[int] = []

    def send() -> tuple[int, int]:
        media_statuses.append(httpx.get(url).status_code)
        return media_statuses[-1], api.get("/api/v1/credits").status_code

    assert set(during_outage(emulator, send)) == {(503, 200)}
    window = outage_window(emulator)
    assert window["closes_at"] - window["opened_at"] == pytest.approx(180)
    assert window["opened_wall"] < window["closes_wall"]
    after = httpx.get(url)
    assert after.status_code == 200 and probe(after.content)[0] == pytest.approx(5, abs=0.5)
    assert emulator.stats()["faults_injected"] == {"media:server_error": media_statuses.count(503)}


@pytest.mark.parametrize(
    ("rule", "code"),
    [
        pytest.param(
            FaultRule(endpoint="api", kind="public_api_disabled", for_seconds=300),
            "public_api_disabled",
            id="public_api_disabled",
        ),
        pytest.param(
            FaultRule(endpoint="api", kind="server_error", status=503, body="envelope", for_seconds=300),
            "upstream_unavailable",
            id="server_error_503",
        ),
    ],
)
def test_api_down_503_on_every_endpoint_for_five_emulated_minutes_then_charges_a_create_once(
    configure_emulator: Any, api: httpx.Client, rule: FaultRule, code: str
) -> None:
    """Models Rivya taking its public API down: every API endpoint answers 503 for 300 emulated seconds
    (0.5 s of real time at time_scale 600) while the media host ("api" spares it) keeps serving; a create
    sent after the window is performed and charged once, and its retry replays it."""
    emulator = configure_emulator(time_scale=600, queued_seconds=0, processing_seconds=0)
    url = finished_video_url(api)
    file_id = upload(api).json()["id"]
    task_id = emulator.stats()["charges"][0]["task_id"]
    emulator.set_faults([rule])
    calls: dict[str, Callable[[], httpx.Response]] = {
        "models": lambda: api.get("/api/v1/models"),
        "upload_file": lambda: upload(api),
        "get_file": lambda: api.get(f"/api/v1/files/{file_id}"),
        "create_generation": lambda: create(api, key="key-after-outage"),
        "get_generation": lambda: api.get(f"/api/v1/generations/{task_id}"),
        "credits": lambda: api.get("/api/v1/credits"),
    }

    def send() -> dict[str, Any]:
        answers = {name: call() for name, call in calls.items()}
        answered = {
            name: (r.status_code, r.json()["error"]["code"] if r.status_code == 503 else None)
            for name, r in answers.items()
        }
        return answered | {"media": httpx.get(url).status_code}

    down = {name: (503, code) for name in calls} | {"media": 200}
    assert all(answers == down for answers in during_outage(emulator, send))
    assert api.get("/api/v1/models").status_code == 200
    created, retried = create(api, key="key-after-outage"), create(api, key="key-after-outage")
    assert created.status_code == retried.status_code == 202 and created.json()["id"] == retried.json()["id"]
    stats = emulator.stats()
    assert (stats["creates_performed"], len(stats["charges"])) == (2, 2)
    assert stats["wallets"][TEST_ACCOUNT] == TEST_CREDITS - 2 * KLING_PRICE
    assert set(stats["faults_injected"]) == {f"{name}:{rule.kind}" for name in calls}


def test_outage_window_opens_at_the_first_matching_request_not_at_install(
    configure_emulator: Any, api: httpx.Client, control: httpx.Client
) -> None:
    """Models an outage armed ahead of traffic: a media rule installed over HTTP long (3 windows) before the
    media host's first request still gives that request, and the 60 emulated seconds after it, the 503;
    API requests meanwhile do not match it, so they neither fail nor open the window."""
    emulator = configure_emulator(time_scale=600, queued_seconds=0, processing_seconds=0)
    url = finished_video_url(api)
    rule = {"endpoint": "media", "kind": "server_error", "status": 503, "for_seconds": 60}
    assert control.post("/faults", json=[rule]).json() == {"faults": 1}
    installed = control.get("/stats").json()["clock_seconds"]
    assert api.get("/api/v1/credits").status_code == 200
    eventually(lambda: control.get("/stats").json()["clock_seconds"] > installed + 3 * 60, "three windows passing")
    assert (outage_window(emulator)["state"], outage_window(emulator)["opened_at"]) == ("pending", None)
    assert httpx.get(url).status_code == 503
    window = outage_window(emulator)
    assert window["opened_at"] > installed + 3 * 60 and window["closes_at"] == window["opened_at"] + 60
    eventually(lambda: outage_window(emulator)["state"] == "closed", "the window closing")
    assert httpx.get(url).status_code == 200
    assert emulator.stats()["faults_injected"]["media:server_error"] >= 1


def test_star_faults_reach_the_media_host_and_api_faults_spare_it(configure_emulator: Any, api: httpx.Client) -> None:
    """Models "everything down" versus "only the API down": "*" matches the media host too, "api" does not."""
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0)
    url = finished_video_url(api)
    emulator.set_faults([FaultRule(endpoint="api", kind="server_error", status=503)])
    assert (api.get("/api/v1/credits").status_code, httpx.get(url).status_code) == (503, 200)
    emulator.set_faults([FaultRule(endpoint="*", kind="server_error", status=503)])
    assert (api.get("/api/v1/credits").status_code, httpx.get(url).status_code) == (503, 503)


@pytest.mark.parametrize("counted", [{"times": 3}, {"rate": 0.5}], ids=["times", "rate"])
def test_outage_window_with_times_or_rate_is_refused(control: httpx.Client, counted: dict[str, Any]) -> None:
    """Models a misconfigured chaos run: a `for_seconds` window combined with a count or a rate is ambiguous,
    so it is refused, in Python and over the control endpoint; so is an empty window."""
    rule = {"endpoint": "media", "kind": "server_error", "status": 503, "for_seconds": 180} | counted
    with pytest.raises(pydantic.ValidationError, match="for_seconds .* without times or rate"):
        FaultRule.model_validate(rule)
    refused = control.post("/faults", json=[rule])
    assert refused.status_code == 400 and "without times or rate" in refused.json()["error"]
    with pytest.raises(pydantic.ValidationError, match="greater than 0"):
        FaultRule(kind="server_error", for_seconds=0)


# --- control endpoints and CLI -------------------------------------------------------------------------


@pytest.fixture
def control(emulator: RivyaEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{emulator.base_url}/_emulator") as client:
        yield client


def test_control_endpoints_drive_the_emulator_from_another_process(
    api: httpx.Client, control: httpx.Client, emulator: RivyaEmulator
) -> None:
    assert control.post("/credits", json={"account": TEST_ACCOUNT, "credits": 500}).status_code == 200
    assert api.get("/api/v1/credits").json() == {"current_credits": 500}
    rules = [{"endpoint": "credits", "kind": "public_api_disabled", "times": 1}]
    assert control.post("/faults", json=rules).status_code == 200
    assert error_code(api.get("/api/v1/credits"), 503) == "public_api_disabled"
    stats = control.get("/stats").json()
    assert stats["requests"] == {"credits": 2} and stats["wallets"] == {TEST_ACCOUNT: 500}
    assert control.post("/faults", json=[{"kind": "meteor_strike"}]).status_code == 400
    assert control.post("/reset", json={"initial_credits": 123}).status_code == 200
    assert api.get("/api/v1/credits").json() == {"current_credits": 123}
    assert control.get("/stats").json()["requests"] == {"credits": 1}
    assert control.post("/reset").status_code == 200
    assert emulator.config.initial_credits == 123


def test_cli_config_file_with_flag_overrides(tmp_path: Any) -> None:
    config_file = tmp_path / "emulator.yaml"
    config_file.write_text("time_scale: 60\nfailure_rate: 0.25\nfaults:\n  - {endpoint: credits, kind: slow}\n")
    args = build_parser().parse_args(["--config", str(config_file), "--failure-rate", "0.5", "--api-key", "rvya_sk_a"])
    config = config_from_args(args)
    assert (config.time_scale, config.failure_rate, config.faults[0].kind) == (60, 0.5, "slow")
    assert [api_key.key for api_key in config.api_keys] == ["rvya_sk_a"]
    assert config_from_args(build_parser().parse_args([])) == EmulatorConfig()


def test_cli_config_file_can_arm_an_outage(tmp_path: Any) -> None:
    """Models a chaos benchmark's emulator: its YAML takes the whole API down for 5 emulated minutes."""
    config_file = tmp_path / "emulator.yaml"
    config_file.write_text("faults:\n  - {endpoint: api, kind: public_api_disabled, for_seconds: 300}\n")
    (rule,) = config_from_args(build_parser().parse_args(["--config", str(config_file)])).faults
    assert (rule.endpoint, rule.kind, rule.for_seconds, rule.times, rule.rate) == (
        "api",
        "public_api_disabled",
        300,
        None,
        None,
    )


def test_cli_serves_until_sigterm() -> None:
    code = "import sys; from rivya_pipeline.emulator.cli import serve; sys.exit(serve(sys.argv[1:]))"
    with subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", "--media-port", "0", "--credits", "77"],
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            api_url = process.stdout.readline().split()[-1]
            media_url = process.stdout.readline().split()[-1]
            credits = httpx.get(f"{api_url}/api/v1/credits", headers=AUTH).json()
            assert credits == {"current_credits": 77} and media_url.startswith("http://127.0.0.1:")
            process.terminate()
            assert process.wait(timeout=10) == 0
        finally:
            process.kill()
