"""VideoStore against moto's S3 server over HTTP: multipart streaming, hashes, failure atomicity, keys."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from rivya_pipeline.storage import MIN_PART_BYTES, VideoStore, make_s3_client

CHUNK = MIN_PART_BYTES


class NetworkLikeSource:
    """A read()-only source (no seek, no hash) like a socket, that records how much each read asked for.

    ``fail_after`` makes it raise once a read would go past that many bytes, as a dropped download does.
    """

    def __init__(self, payload: bytes, *, fail_after: int | None = None) -> None:
        self._payload = memoryview(payload)
        self._position = 0
        self._fail_after = fail_after
        self.read_sizes: list[int] = []

    def read(self, size: int = -1) -> bytes:
        self.read_sizes.append(size)
        end = len(self._payload) if size < 0 else min(self._position + size, len(self._payload))
        if self._fail_after is not None and end > self._fail_after:
            raise ConnectionResetError("source dropped the connection")
        data = bytes(self._payload[self._position : end])
        self._position = end
        return data


def payload_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def store(s3_bucket, s3_endpoint_url) -> VideoStore:
    client, bucket = s3_bucket
    return VideoStore(client, bucket, "videos", chunk_bytes=CHUNK, max_concurrency=2, endpoint_url=s3_endpoint_url)


def test_multipart_store_records_the_files_own_sha256_and_size(store, s3_bucket):
    client, bucket = s3_bucket
    payload = payload_of(2 * CHUNK + 12_345, seed=1)
    source = NetworkLikeSource(payload)

    stored = store.store_video("brief-a", "task_1", source)

    expected = hashlib.sha256(payload).hexdigest()
    assert stored.key == "videos/brief-a/task_1.mp4"
    assert stored.uri == f"s3://{bucket}/videos/brief-a/task_1.mp4"
    assert (stored.size_bytes, stored.sha256) == (len(payload), expected)
    assert stored.etag.endswith("-3"), "three parts: the upload really was multipart"
    assert store.object_sha256(stored.key) == expected
    assert client.head_object(Bucket=bucket, Key=stored.key)["ContentType"] == "video/mp4"
    assert max(source.read_sizes) <= CHUNK
    assert store.open_multipart_uploads() == []


def test_small_video_is_stored_in_one_put(store):
    payload = payload_of(1000, seed=2)

    stored = store.store_video("brief-a", "task_small", NetworkLikeSource(payload))

    assert (stored.size_bytes, stored.sha256) == (1000, hashlib.sha256(payload).hexdigest())
    assert "-" not in stored.etag
    with store.open_object(stored.key) as body:
        assert body.read() == payload


def test_progress_reports_a_running_total_that_ends_at_the_size(store):
    payload = payload_of(CHUNK + 777, seed=3)
    totals: list[int] = []

    store.store_video("brief-a", "task_progress", NetworkLikeSource(payload), progress=totals.append)

    assert len(totals) > 1
    assert totals[-1] == len(payload)


def test_failed_upload_keeps_the_previous_object_and_leaves_no_multipart_upload(store):
    first = payload_of(1000, seed=4)
    stored_first = store.store_video("brief-a", "task_2", NetworkLikeSource(first))
    second = payload_of(3 * CHUNK, seed=5)

    with pytest.raises(ConnectionResetError):
        store.store_video("brief-a", "task_2", NetworkLikeSource(second, fail_after=2 * CHUNK + 1))

    assert store.object_sha256(stored_first.key) == hashlib.sha256(first).hexdigest()
    assert store.open_multipart_uploads() == []


def test_stale_multipart_upload_of_the_same_key_is_aborted_before_storing(store, s3_bucket):
    client, bucket = s3_bucket
    key = store.video_key("brief-a", "task_3")
    sibling = store.video_key("brief-a", "task_30")
    for stale_key in (key, sibling):
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=stale_key)["UploadId"]
        client.upload_part(Bucket=bucket, Key=stale_key, UploadId=upload_id, PartNumber=1, Body=b"x" * CHUNK)

    store.store_video("brief-a", "task_3", NetworkLikeSource(payload_of(100, seed=6)))

    assert [open_key for open_key, _ in store.open_multipart_uploads()] == [sibling]


@pytest.mark.parametrize(
    ("brief_id", "task_id", "field"),
    [
        ("../x", "task_1", "brief_id"),
        ("Brief", "task_1", "brief_id"),
        ("", "task_1", "brief_id"),
        ("-brief", "task_1", "brief_id"),
        ("a/b", "task_1", "brief_id"),
        ("b" * 65, "task_1", "brief_id"),
        ("brief\n", "task_1", "brief_id"),
        ("brief", "", "task_id"),
        ("brief", "../task", "task_id"),
        ("brief", "task.1", "task_id"),
        ("brief", "t" * 129, "task_id"),
    ],
)
def test_keys_are_built_only_from_valid_pieces(store, brief_id, task_id, field):
    with pytest.raises(ValueError, match=field):
        store.video_key(brief_id, task_id)
    with pytest.raises(ValueError, match=field):
        store.store_video(brief_id, task_id, NetworkLikeSource(b"never read"))


@pytest.mark.parametrize(
    ("prefix", "expected_key"),
    [("/runs/2026/", "runs/2026/b/t.mp4"), ("", "b/t.mp4"), ("/", "b/t.mp4"), ("v1.0", "v1.0/b/t.mp4")],
)
def test_prefix_is_normalized(s3_bucket, prefix, expected_key):
    client, bucket = s3_bucket
    assert VideoStore(client, bucket, prefix).video_key("b", "t") == expected_key


@pytest.mark.parametrize("prefix", ["a/../b", "..", "a//b", "./a", "a b", "a\\b"])
def test_bad_prefix_is_refused(s3_bucket, prefix):
    client, bucket = s3_bucket
    with pytest.raises(ValueError, match="prefix"):
        VideoStore(client, bucket, prefix)


def test_part_size_below_the_s3_minimum_is_refused(s3_bucket):
    client, bucket = s3_bucket
    with pytest.raises(ValueError, match="chunk_bytes"):
        VideoStore(client, bucket, "videos", chunk_bytes=MIN_PART_BYTES - 1)


def test_sidecar_is_sorted_json_next_to_the_video(store, s3_bucket):
    client, bucket = s3_bucket
    document = {"task_id": "task_1", "brief_id": "brief-a", "sha256": "ab" * 32, "title": "Fjörd"}

    stored = store.write_sidecar("brief-a", "task_1", document)

    assert stored.key == "videos/brief-a/task_1.json"
    response = client.get_object(Bucket=bucket, Key=stored.key)
    body = response["Body"].read()
    assert response["ContentType"] == "application/json"
    assert json.loads(body) == document
    assert list(json.loads(body)) == sorted(document)
    assert (stored.size_bytes, stored.sha256) == (len(body), hashlib.sha256(body).hexdigest())


def test_console_url_points_at_the_custom_endpoint_or_the_aws_console(store, s3_bucket, s3_endpoint_url):
    client, bucket = s3_bucket
    stored = store.write_sidecar("brief-a", "task_1", {})
    assert stored.console_url == f"{s3_endpoint_url}/{bucket}/videos/brief-a/task_1.json"

    on_aws = VideoStore(client, bucket, "videos").write_sidecar("brief-a", "task_1", {})
    assert on_aws.console_url == (
        f"https://s3.console.aws.amazon.com/s3/object/{bucket}?region=us-east-1&prefix=videos%2Fbrief-a%2Ftask_1.json"
    )


def test_client_for_s3_compatible_stores_sends_checksums_only_when_required(s3_bucket, s3_endpoint_url):
    _, bucket = s3_bucket
    client = make_s3_client(endpoint_url=s3_endpoint_url, region="us-east-1", checksum_when_required=True)
    payload = payload_of(CHUNK + 1, seed=7)

    stored = VideoStore(client, bucket, "videos", chunk_bytes=CHUNK).store_video(
        "brief-a", "task_4", NetworkLikeSource(payload)
    )

    assert client.meta.config.request_checksum_calculation == "when_required"
    assert client.meta.config.response_checksum_validation == "when_required"
    assert client.meta.config.s3 == {"addressing_style": "path"}
    assert stored.sha256 == hashlib.sha256(payload).hexdigest()
