"""S3 store for finished videos and their JSON sidecars.

Videos are streamed into boto3's managed multipart upload, so memory is bounded by the part size and
the number of parts in flight, never by the video's size. S3's own multipart checksums are composite
(not the file's hash), so we compute our own SHA-256 while streaming and report it with the object.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeGuard
from urllib.parse import quote

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from .brief_rules import BRIEF_ID

# S3 rejects multipart parts under 5 MiB (except the last); s3transfer would silently raise smaller
# part sizes to this, breaking our promise that no read exceeds chunk_bytes.
MIN_PART_BYTES = 5 * 1024**2

_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
_MMAP_THRESHOLD_BYTES = 1024**2

PictureKind = Literal["poster", "sheet"]
_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class HashedReadable(Readable, Protocol):
    """A readable that hashes and counts what it hands out (the media fetcher's stream, `_HashingReader`)."""

    bytes_read: int

    def sha256_hex(self) -> str: ...


def _hashes_itself(readable: Readable) -> TypeGuard[HashedReadable]:
    return hasattr(readable, "sha256_hex") and hasattr(readable, "bytes_read")


@dataclass(frozen=True)
class StoredObject:
    """Where an object landed and what it holds, for asset metadata and checks."""

    bucket: str
    key: str
    uri: str
    size_bytes: int
    sha256: str
    etag: str
    console_url: str


class _HashingReader:
    """Wraps any readable so the bytes boto3 consumes are hashed and counted on the way through."""

    def __init__(self, source: Readable) -> None:
        self._source = source
        self._hash = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._hash.update(data)
        self.bytes_read += len(data)
        return data

    def sha256_hex(self) -> str:
        return self._hash.hexdigest()


class _ProgressTotal:
    """Turns boto3's per-part byte increments (from several threads) into a running total."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self._report = report
        self._total = 0
        self._lock = threading.Lock()

    def __call__(self, increment: int) -> None:
        with self._lock:
            self._total += increment
            self._report(self._total)


@functools.cache
def _map_large_buffers_on_their_own() -> None:
    """Give every buffer of 1 MiB or more its own memory mapping, returned to the OS when it is freed.

    Multipart parts are multi-MiB buffers that one thread allocates and another frees. glibc raises its mmap
    threshold to the size of the first such buffer freed and serves the rest from its heaps, where freed parts
    stay resident and fragment, so the process grows with the size of the video instead of staying flat
    (README, Benchmarks: transfer). Process-wide, once; nothing happens off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def _normalized_prefix(prefix: str) -> str:
    segments = prefix.strip("/").split("/") if prefix.strip("/") else []
    for segment in segments:
        if segment in (".", "..") or not _PREFIX_SEGMENT.fullmatch(segment):
            raise ValueError(f"prefix {prefix!r}: segment {segment!r} is empty, '.'/'..' or has odd characters")
    return "/".join(segments)


class VideoStore:
    """Writes videos, their pictures and sidecars under ``{prefix}/{brief_id}/{task_id}.*`` in one bucket.

    One writer per key is assumed (one Dagster run per task): storing aborts any unfinished multipart
    upload of the same key, which would also cut off a concurrent writer of that key.
    """

    def __init__(
        self,
        s3_client: Any,
        bucket: str,
        prefix: str,
        *,
        chunk_bytes: int = 8 * 1024**2,
        max_concurrency: int = 4,
        endpoint_url: str | None = None,
    ) -> None:
        if chunk_bytes < MIN_PART_BYTES:
            raise ValueError(f"chunk_bytes must be at least {MIN_PART_BYTES} (S3's smallest multipart part)")
        _map_large_buffers_on_their_own()
        self._s3 = s3_client
        self.bucket = bucket
        self.prefix = _normalized_prefix(prefix)
        self._chunk_bytes = chunk_bytes
        self._endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self._transfer_config = TransferConfig(
            multipart_threshold=chunk_bytes, multipart_chunksize=chunk_bytes, max_concurrency=max_concurrency
        )
        # A stream (not a file) is uploaded from parts read into memory: s3transfer keeps up to 10 by default
        # (80 MiB at 8 MiB) whatever the concurrency. No more than can be in flight, so memory stays at about
        # (max_concurrency + 1) parts.
        self._transfer_config.max_in_memory_upload_chunks = max_concurrency

    def video_key(self, brief_id: str, task_id: str) -> str:
        return self._key(brief_id, task_id, "mp4")

    def sidecar_key(self, brief_id: str, task_id: str) -> str:
        return self._key(brief_id, task_id, "json")

    def picture_key(self, brief_id: str, task_id: str, kind: PictureKind) -> str:
        """``{task_id}.poster.jpg`` or ``{task_id}.sheet.jpg``, next to the video."""
        return self._key(brief_id, task_id, f"{kind}.jpg")

    def store_video(
        self,
        brief_id: str,
        task_id: str,
        readable: Readable,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> StoredObject:
        """Stream ``readable`` to the video key; on failure the previous object at that key stays.

        A readable that already hashes itself (``sha256_hex()`` and ``bytes_read``, like the media
        fetcher's stream) is used as is; anything else is wrapped so it is hashed while streaming.
        """
        key = self.video_key(brief_id, task_id)
        self._abort_multipart_uploads(key)
        hashed: HashedReadable = readable if _hashes_itself(readable) else _HashingReader(readable)
        # On failure s3transfer aborts its multipart upload, and S3 only makes an object visible on
        # CompleteMultipartUpload: a failed upload neither leaves a partial object nor replaces the old one.
        self._s3.upload_fileobj(
            hashed,
            self.bucket,
            key,
            ExtraArgs={"ContentType": "video/mp4"},
            Config=self._transfer_config,
            Callback=_ProgressTotal(progress) if progress else None,
        )
        head = self._s3.head_object(Bucket=self.bucket, Key=key)
        return self._stored(key, head["ContentLength"], hashed.sha256_hex(), head["ETag"])

    def write_sidecar(self, brief_id: str, task_id: str, document: dict[str, Any]) -> StoredObject:
        """Write the JSON record next to the video (sorted keys, so equal documents give equal bytes)."""
        body = (json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
        return self._put(self.sidecar_key(brief_id, task_id), body, "application/json")

    def store_picture(self, brief_id: str, task_id: str, kind: PictureKind, jpeg: bytes) -> StoredObject:
        """Write a poster or contact sheet JPEG next to the video."""
        return self._put(self.picture_key(brief_id, task_id, kind), jpeg, "image/jpeg")

    def _put(self, key: str, body: bytes, content_type: str) -> StoredObject:
        response = self._s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        return self._stored(key, len(body), hashlib.sha256(body).hexdigest(), response["ETag"])

    def object_sha256(self, key: str) -> str:
        """Hash the stored object by streaming it back, to check it against the recorded SHA-256."""
        digest = hashlib.sha256()
        body = self.open_object(key)
        try:
            for chunk in body.iter_chunks(self._chunk_bytes):
                digest.update(chunk)
        finally:
            body.close()
        return digest.hexdigest()

    def open_object(self, key: str) -> Any:
        """The object's botocore StreamingBody (read it in chunks; close it when done)."""
        return self._s3.get_object(Bucket=self.bucket, Key=key)["Body"]

    def open_multipart_uploads(self, prefix: str | None = None) -> list[tuple[str, str]]:
        """(key, upload_id) of unfinished multipart uploads under ``prefix`` (default: the store's)."""
        paginator = self._s3.get_paginator("list_multipart_uploads")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix if prefix is None else prefix)
        return [(upload["Key"], upload["UploadId"]) for page in pages for upload in page.get("Uploads", [])]

    def _abort_multipart_uploads(self, key: str) -> None:
        """Abort uploads a killed process left for exactly ``key``: their parts are billed until aborted."""
        for stale_key, upload_id in self.open_multipart_uploads(prefix=key):
            if stale_key == key:
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def _key(self, brief_id: str, task_id: str, extension: str) -> str:
        if not BRIEF_ID.fullmatch(brief_id):
            raise ValueError(f"brief_id {brief_id!r} must match {BRIEF_ID.pattern}")
        if not _TASK_ID.fullmatch(task_id):
            raise ValueError(f"task_id {task_id!r} must match {_TASK_ID.pattern}")
        return "/".join(filter(None, [self.prefix, brief_id, f"{task_id}.{extension}"]))

    def _stored(self, key: str, size_bytes: int, sha256: str, etag: str) -> StoredObject:
        return StoredObject(
            bucket=self.bucket,
            key=key,
            uri=f"s3://{self.bucket}/{key}",
            size_bytes=size_bytes,
            sha256=sha256,
            etag=etag.strip('"'),
            console_url=self._console_url(key),
        )

    def _console_url(self, key: str) -> str:
        if self._endpoint_url:
            return f"{self._endpoint_url}/{self.bucket}/{quote(key)}"
        region = self._s3.meta.region_name or "us-east-1"
        return (
            f"https://s3.console.aws.amazon.com/s3/object/{quote(self.bucket)}"
            f"?region={quote(region)}&prefix={quote(key, safe='')}"
        )


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    checksum_when_required: bool = False,
    max_pool_connections: int = 16,
) -> Any:
    """An S3 client from the standard credential chain, tuned for this store.

    A custom endpoint (MinIO, R2, Ceph, moto) gets path-style addressing; ``checksum_when_required``
    stops boto3 from sending the newer default checksum headers that some S3-compatible stores reject.
    Keep ``max_pool_connections`` at or above the store's ``max_concurrency``.
    """
    options: dict[str, Any] = {"max_pool_connections": max_pool_connections, "retries": {"mode": "standard"}}
    if endpoint_url:
        options["s3"] = {"addressing_style": "path"}
    if checksum_when_required:
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    # A session of its own: boto3's default session is not safe to create clients from in parallel.
    return boto3.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=Config(**options))


@functools.lru_cache(maxsize=8)
def shared_s3_client(
    endpoint_url: str | None = None, region: str | None = None, checksum_when_required: bool = False
) -> Any:
    """One S3 client (so one connection pool) per configuration in this process, shared by every run in it.

    Building a client loads S3's service model (0.1-0.3 s); each store run built its own, once per video.
    boto3 clients are thread-safe, and credentials that expire (instance roles, web identity) refresh
    themselves; static keys are read once, when the first client of a configuration is made.
    """
    return make_s3_client(endpoint_url, region, checksum_when_required)
