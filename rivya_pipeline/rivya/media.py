"""Fetch finished result videos from the media host (a CDN), never from the API host.

Result URLs come from Rivya's task objects, so they are data we did not choose. The fetcher treats
them as untrusted: https only, public addresses only, every redirect hop re-checked, a hard byte cap,
and never an Authorization header (the Rivya key must only ever reach the API base URL).

DNS-rebinding gap (not closed): the address check resolves the host with ``socket.getaddrinfo``, then
httpx resolves it again when it connects. A hostile DNS server could answer "public" to the first
lookup and "private" to the second. Closing it means connecting to the checked address with the
original name as TLS SNI; the risk here is low (the URLs come from one vendor's API, the body is only
stored, never interpreted), so we accept the gap and keep the standard connection pool.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import httpx

from .tls import shared_ssl_context

FetchRefusal = Literal["invalid_url", "scheme", "private_address", "redirect", "too_large", "http_status", "transport"]


class MediaFetchError(Exception):
    """A result video could not be fetched; ``reason`` says which rule or failure stopped it."""

    def __init__(self, reason: FetchRefusal, message: str, *, url: str | None = None) -> None:
        self.reason: FetchRefusal = reason
        self.url = url
        super().__init__(f"{message} ({url})" if url else message)


def _redacted(url: httpx.URL) -> str:
    """Scheme, host and path only: CDN URLs often carry signed tokens in the query string."""
    return f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}"


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True only for globally routable unicast addresses (so not private, loopback, link-local, ...).

    IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) all count as non-public, even for a public a.b.c.d:
    refusing too much is the safe side, and public DNS does not hand those out.
    """
    return address.is_global and not address.is_multicast


class MediaStream:
    """A file-like view of one streamed download that hashes what it hands out.

    ``read(n)`` returns exactly ``n`` bytes until the end of the body (like a buffered file), because
    boto3 sizes multipart parts by what one ``read`` returns and S3 rejects parts under 5 MiB.
    """

    def __init__(self, response: httpx.Response, *, max_bytes: int, chunk_bytes: int) -> None:
        self.url = str(response.url)
        declared = response.headers.get("content-length")
        self.content_length: int | None = int(declared) if declared is not None else None
        self.bytes_read = 0
        self._redacted_url = _redacted(response.url)
        self._max_bytes = max_bytes
        self._chunks = response.iter_bytes(chunk_bytes)
        self._pending = bytearray()
        self._received = 0
        self._exhausted = False
        self._hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all remaining if negative or None); ``b""`` at the end of the body."""
        while not self._exhausted and (size is None or size < 0 or len(self._pending) < size):
            self._pull_chunk()
        take = len(self._pending) if size is None or size < 0 else min(size, len(self._pending))
        with memoryview(self._pending) as pending:
            data = bytes(pending[:take])  # one copy: slicing the bytearray itself would make a second one
        del self._pending[:take]
        self._hash.update(data)
        self.bytes_read += len(data)
        return data

    def sha256_hex(self) -> str:
        """SHA-256 of the bytes read so far: the whole body's hash once ``read`` returned ``b""``."""
        return self._hash.hexdigest()

    def _pull_chunk(self) -> None:
        try:
            chunk = next(self._chunks, None)
        except httpx.HTTPError as exc:
            raise MediaFetchError(
                "transport", f"download broke off: {type(exc).__name__}", url=self._redacted_url
            ) from exc
        if chunk is None:
            self._exhausted = True
            return
        self._received += len(chunk)
        if self._received > self._max_bytes:
            raise MediaFetchError("too_large", f"body exceeds the {self._max_bytes}-byte cap", url=self._redacted_url)
        self._pending += chunk


class MediaFetcher:
    """Downloads result media over one pooled httpx client that the fetcher owns.

    Owning the client is what guarantees no Authorization header: nothing configured for the Rivya
    API (auth, default headers, event hooks) can leak into media requests. ``allow_local`` permits
    http and private/loopback hosts, for the local emulator and tests only. ``timeout`` bounds the
    connect and each read, not the whole download (``max_bytes`` bounds that).
    """

    def __init__(
        self,
        *,
        allow_local: bool = False,
        max_bytes: int = 2 * 1024**3,
        timeout: float = 60.0,
        max_redirects: int = 3,
        chunk_bytes: int = 1024 * 1024,
    ) -> None:
        self._allow_local = allow_local
        self._max_bytes = max_bytes
        self._max_redirects = max_redirects
        self._chunk_bytes = chunk_bytes
        # trust_env=False: a proxy from the environment would connect on our behalf and make the
        # address check meaningless. identity encoding keeps Content-Length equal to the stored size.
        self._client = httpx.Client(
            follow_redirects=False,
            timeout=httpx.Timeout(timeout),
            trust_env=False,
            headers={"Accept-Encoding": "identity"},
            verify=shared_ssl_context(trust_env=False),
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> MediaFetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def open(self, url: str) -> Iterator[MediaStream]:
        """Open ``url`` for streaming; the connection goes back to the pool when the block ends."""
        response = self._send_following_redirects(url)
        try:
            stream = MediaStream(response, max_bytes=self._max_bytes, chunk_bytes=self._chunk_bytes)
            if stream.content_length is not None and stream.content_length > self._max_bytes:
                raise MediaFetchError(
                    "too_large",
                    f"declared size {stream.content_length} exceeds the {self._max_bytes}-byte cap",
                    url=_redacted(response.url),
                )
            yield stream
        finally:
            response.close()

    def _send_following_redirects(self, url: str) -> httpx.Response:
        """GET with redirects followed by hand, so every hop passes the same checks as the first."""
        target = self._checked_url(url)
        for _ in range(self._max_redirects + 1):
            try:
                response = self._client.send(self._client.build_request("GET", target), stream=True)
            except httpx.HTTPError as exc:
                raise MediaFetchError(
                    "transport", f"request failed: {type(exc).__name__}", url=_redacted(target)
                ) from exc
            if not response.has_redirect_location:
                if not response.is_success:
                    response.close()
                    raise MediaFetchError(
                        "http_status",
                        f"media host answered HTTP {response.status_code}",
                        url=_redacted(target),
                    )
                return response
            response.close()
            target = self._checked_url(str(target.join(response.headers["location"])))
        raise MediaFetchError("redirect", f"more than {self._max_redirects} redirects", url=_redacted(target))

    def _checked_url(self, url: str) -> httpx.URL:
        """Parse ``url`` and refuse it unless it is an https URL of a public host."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise MediaFetchError("invalid_url", "not a valid URL") from exc
        allowed_schemes = ("https", "http") if self._allow_local else ("https",)
        if parsed.scheme not in allowed_schemes:
            raise MediaFetchError("scheme", f"scheme {parsed.scheme!r} is not allowed", url=_redacted(parsed))
        if not parsed.host:
            raise MediaFetchError("invalid_url", "URL has no host", url=_redacted(parsed))
        if parsed.userinfo:
            # httpx would turn user:password@ into an Authorization header.
            raise MediaFetchError("invalid_url", "URL carries credentials", url=_redacted(parsed))
        if not self._allow_local:
            self._refuse_non_public_host(parsed)
        return parsed

    def _refuse_non_public_host(self, url: httpx.URL) -> None:
        """Every address the host resolves to must be public: one private answer is enough to refuse."""
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            answers = socket.getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name the IDNA codec cannot encode
            raise MediaFetchError("transport", "cannot resolve the media host", url=_redacted(url)) from exc
        for *_, sockaddr in answers:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if not _is_public(address):
                raise MediaFetchError(
                    "private_address", f"host resolves to non-public address {address}", url=_redacted(url)
                )
