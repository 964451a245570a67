"""MediaFetcher against a real local media host (starlette on uvicorn, in a thread), and into S3."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import botocore.exceptions
import pytest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from rivya_pipeline.emulator.serving import BackgroundServers, bind, url_of
from rivya_pipeline.rivya.media import MediaFetcher, MediaFetchError
from rivya_pipeline.storage import MIN_PART_BYTES, VideoStore

SERVE_CHUNK = 64 * 1024


def payload_of(size: int) -> bytes:
    """The bytes the media host serves for a body of ``size`` bytes (the same on every request)."""
    return random.Random(size).randbytes(size)


def sha256_of(size: int) -> str:
    return hashlib.sha256(payload_of(size)).hexdigest()


@dataclass
class SeenRequest:
    path: str
    headers: Headers
    client_port: int


@dataclass
class MediaHost:
    base_url: str
    seen: list[SeenRequest] = field(default_factory=list)


def _pieces(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), SERVE_CHUNK):
        yield body[start : start + SERVE_CHUNK]


async def blob(request: Request) -> Response:
    """A body with Content-Length, streamed out in pieces like a CDN does."""
    size = request.path_params["size"]
    return StreamingResponse(_pieces(payload_of(size)), headers={"content-length": str(size)})


async def chunked(request: Request) -> Response:
    """A body without Content-Length (chunked transfer encoding): only counting can cap it."""
    return StreamingResponse(_pieces(payload_of(request.path_params["size"])))


async def stalled(request: Request) -> Response:
    """Sends one piece, then goes quiet for longer than the test client's timeout."""

    async def first_piece_then_silence() -> AsyncIterator[bytes]:
        yield b"x" * 10
        await asyncio.sleep(1.0)
        yield b"y" * 10

    return StreamingResponse(first_piece_then_silence())


async def redirect(request: Request) -> Response:
    return RedirectResponse(request.query_params["to"], status_code=302)


async def redirect_chain(request: Request) -> Response:
    hops = request.path_params["hops"]
    return RedirectResponse(f"/chain/{hops - 1}" if hops > 1 else "/blob/1000", status_code=307)


async def status(request: Request) -> Response:
    return Response(b"no such video", status_code=request.path_params["code"])


class TruncatedBody:
    """Declares a Content-Length, sends half of it and ends the response: the server drops the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b"z" * 500, "more_body": False})


def build_app(seen: list[SeenRequest]):
    app = Starlette(
        routes=[
            Route("/blob/{size:int}", blob),
            Route("/chunked/{size:int}", chunked),
            Route("/stalled", stalled),
            Route("/redirect", redirect),
            Route("/chain/{hops:int}", redirect_chain),
            Route("/status/{code:int}", status),
            Route("/truncated", TruncatedBody()),
        ]
    )

    async def recording_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen.append(SeenRequest(scope["path"], Headers(scope=scope), scope["client"][1]))
        await app(scope, receive, send)

    return recording_app


@pytest.fixture(scope="module")
def media_server() -> Iterator[MediaHost]:
    seen: list[SeenRequest] = []
    sock = bind()
    with BackgroundServers("media-host", [(build_app(seen), sock)], log_level="critical"):
        yield MediaHost(base_url=url_of(sock), seen=seen)


@pytest.fixture
def media(media_server: MediaHost) -> MediaHost:
    """The shared media host with its request log cleared for this test."""
    media_server.seen.clear()
    return media_server


@pytest.fixture
def fetcher() -> Iterator[MediaFetcher]:
    with MediaFetcher(allow_local=True, chunk_bytes=16 * 1024) as local_fetcher:
        yield local_fetcher


def refusal(fetcher: MediaFetcher, url: str) -> MediaFetchError:
    """The error ``open`` raises for ``url``; fails the test if a stream was handed out at all."""
    with pytest.raises(MediaFetchError) as raised, fetcher.open(url):
        pytest.fail("the fetcher handed out a stream")
    return raised.value


# --- streaming -------------------------------------------------------------------------------------


def test_reads_return_exactly_the_requested_size_and_the_hash_covers_the_body(fetcher, media):
    url = f"{media.base_url}/blob/300000"
    with fetcher.open(url) as stream:
        assert (stream.url, stream.content_length) == (url, 300_000)
        sizes = [len(stream.read(100_000)), len(stream.read(100_000))]
        rest = stream.read()
        assert stream.read(1) == b""
    assert sizes == [100_000, 100_000]
    assert len(rest) == 100_000
    assert stream.bytes_read == 300_000
    assert stream.sha256_hex() == sha256_of(300_000)


def test_body_without_content_length_streams_to_the_end(fetcher, media):
    with fetcher.open(f"{media.base_url}/chunked/50000") as stream:
        assert stream.content_length is None
        body = stream.read()
    assert body == payload_of(50_000)


def test_one_connection_serves_consecutive_downloads(fetcher, media):
    for _ in range(2):
        with fetcher.open(f"{media.base_url}/blob/1000") as stream:
            stream.read()
    assert len({seen.client_port for seen in media.seen}) == 1


def test_no_authorization_header_reaches_the_media_host_on_any_hop(fetcher, media):
    with fetcher.open(f"{media.base_url}/chain/2") as stream:
        stream.read()
    assert [seen.path for seen in media.seen] == ["/chain/2", "/chain/1", "/blob/1000"]
    assert all("authorization" not in seen.headers for seen in media.seen)


# --- refusals before any request ------------------------------------------------------------------


def test_http_is_refused_unless_local_is_allowed(media):
    with MediaFetcher() as strict:
        error = refusal(strict, f"{media.base_url}/blob/10")
    assert error.reason == "scheme"
    assert media.seen == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/video.mp4"])
def test_other_schemes_are_refused_even_when_local_is_allowed(fetcher, url):
    assert refusal(fetcher, url).reason == "scheme"


def test_url_with_credentials_is_refused_so_httpx_cannot_turn_them_into_authorization(fetcher, media):
    url = media.base_url.replace("http://", "http://user:secret@") + "/blob/10"
    error = refusal(fetcher, url)
    assert error.reason == "invalid_url"
    assert "secret" not in str(error)
    assert media.seen == []


def test_host_name_resolving_to_loopback_is_refused_before_connecting(media):
    port = media.base_url.rsplit(":", 1)[1]
    with MediaFetcher() as strict:
        error = refusal(strict, f"https://localhost:{port}/blob/10")
    assert error.reason == "private_address"
    assert media.seen == []


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "[::1]",
        "[fe80::1]",
        "[fc00::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:10.0.0.1]",
    ],
)
def test_non_public_addresses_are_refused(host):
    with MediaFetcher() as strict:
        assert refusal(strict, f"https://{host}/video.mp4?token=signed").reason == "private_address"


def test_host_name_that_cannot_be_resolved_is_refused():
    with MediaFetcher() as strict:
        error = refusal(strict, f"https://{'a' * 64}.example/video.mp4")
    assert error.reason == "transport"


def test_error_messages_leave_out_the_signed_query_string(fetcher):
    error = refusal(fetcher, "ftp://cdn.example/video.mp4?token=signed-secret")
    assert error.url == "ftp://cdn.example/video.mp4"
    assert "signed-secret" not in str(error)


# --- redirects -------------------------------------------------------------------------------------


def test_redirect_is_followed_and_the_stream_reports_the_final_url(fetcher, media):
    with fetcher.open(f"{media.base_url}/redirect?to=/blob/1000") as stream:
        body = stream.read()
        final_url = stream.url
    assert final_url == f"{media.base_url}/blob/1000"
    assert body == payload_of(1000)


@pytest.mark.parametrize(
    ("target", "reason"),
    [("file:///etc/passwd", "scheme"), ("http://user:pw@127.0.0.1/blob/10", "invalid_url")],
)
def test_every_redirect_hop_is_checked_again(fetcher, media, target, reason):
    assert refusal(fetcher, f"{media.base_url}/redirect?to={target}").reason == reason
    assert [seen.path for seen in media.seen] == ["/redirect"]


@pytest.mark.parametrize(("hops", "max_redirects"), [(1, 0), (3, 2)])
def test_too_many_redirects_are_refused(media, hops, max_redirects):
    with MediaFetcher(allow_local=True, max_redirects=max_redirects) as fetcher:
        assert refusal(fetcher, f"{media.base_url}/chain/{hops}").reason == "redirect"
    assert len(media.seen) == max_redirects + 1


# --- size caps and failures -----------------------------------------------------------------------


def test_declared_size_over_the_cap_is_refused_before_reading(media):
    with MediaFetcher(allow_local=True, max_bytes=1000) as fetcher:
        error = refusal(fetcher, f"{media.base_url}/blob/5000")
    assert error.reason == "too_large"


def test_streamed_body_over_the_cap_is_cut_off(media):
    with (
        MediaFetcher(allow_local=True, max_bytes=100_000, chunk_bytes=16 * 1024) as fetcher,
        pytest.raises(MediaFetchError) as raised,
        fetcher.open(f"{media.base_url}/chunked/300000") as stream,
    ):
        while stream.read(10_000):
            pass
    assert raised.value.reason == "too_large"
    assert stream.bytes_read <= 100_000


@pytest.mark.parametrize("code", [404, 410, 500, 204])
def test_non_success_status_is_an_error_but_any_2xx_is_not(fetcher, media, code):
    url = f"{media.base_url}/status/{code}"
    if code == 204:
        with fetcher.open(url) as stream:
            assert stream.read() == b""
    else:
        error = refusal(fetcher, url)
        assert error.reason == "http_status"
        assert str(code) in str(error)


def test_body_shorter_than_its_content_length_is_a_transport_error(fetcher, media):
    with pytest.raises(MediaFetchError) as raised, fetcher.open(f"{media.base_url}/truncated") as stream:
        stream.read()
    assert raised.value.reason == "transport"


def test_stalled_body_times_out_as_a_transport_error(media):
    with (
        MediaFetcher(allow_local=True, timeout=0.2) as fetcher,
        pytest.raises(MediaFetchError) as raised,
        fetcher.open(f"{media.base_url}/stalled") as stream,
    ):
        stream.read()
    assert raised.value.reason == "transport"


def test_refused_connection_is_a_transport_error(fetcher):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    assert refusal(fetcher, f"http://127.0.0.1:{closed_port}/blob/10").reason == "transport"


# --- into S3 -------------------------------------------------------------------------------------


class ReadSizeRecorder:
    """Passes a MediaStream through to the store while recording the size of every read."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.sizes: list[int] = []

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.sizes.append(len(data))
        return data

    def sha256_hex(self) -> str:
        return self._stream.sha256_hex()

    @property
    def bytes_read(self) -> int:
        return self._stream.bytes_read


@pytest.fixture
def video_store(s3_bucket) -> VideoStore:
    client, bucket = s3_bucket
    return VideoStore(client, bucket, "videos", chunk_bytes=MIN_PART_BYTES, max_concurrency=2)


def test_download_streams_into_a_multipart_upload_with_matching_hash(fetcher, media, video_store):
    size = 2 * MIN_PART_BYTES + 12_345
    with fetcher.open(f"{media.base_url}/blob/{size}") as stream:
        recorder = ReadSizeRecorder(stream)
        stored = video_store.store_video("brief-a", "task_1", recorder)

    assert (stored.size_bytes, stored.sha256) == (size, sha256_of(size))
    assert video_store.object_sha256(stored.key) == sha256_of(size)
    assert stored.etag.endswith("-3")
    assert max(recorder.sizes) <= MIN_PART_BYTES


def test_download_over_the_cap_mid_upload_leaves_nothing_in_s3(media, video_store, s3_bucket):
    client, bucket = s3_bucket
    with (
        MediaFetcher(allow_local=True, max_bytes=2 * MIN_PART_BYTES + 1) as fetcher,
        pytest.raises(MediaFetchError) as raised,
        fetcher.open(f"{media.base_url}/chunked/{3 * MIN_PART_BYTES}") as stream,
    ):
        video_store.store_video("brief-a", "task_2", stream)

    assert raised.value.reason == "too_large"
    assert video_store.open_multipart_uploads() == []
    with pytest.raises(botocore.exceptions.ClientError, match="404"):
        client.head_object(Bucket=bucket, Key=video_store.video_key("brief-a", "task_2"))
