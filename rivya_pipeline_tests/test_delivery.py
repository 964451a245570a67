"""The probe copy that delivery writes beside the upload (in a thread of its own): complete, in order, and a
failed write stops the upload instead of leaving a video that was never checked; the poster and the contact sheet
stored next to the video and named in the sidecar. Emulator and S3 over HTTP."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import wave
from pathlib import Path

import pytest
from PIL import Image

from rivya_pipeline.delivery import _TeeReader, deliver_video
from rivya_pipeline.rivya import RivyaClient
from rivya_pipeline.rivya.media import MediaFetcher
from rivya_pipeline.storage import MIN_PART_BYTES, VideoStore
from rivya_pipeline_tests.fixtures_emulator import TEST_API_KEY

VIDEO_BYTES = 3 * MIN_PART_BYTES + 12345  # four parts, the last one short
BODY = {"model": "kling-3-0", "prompt": "Waves on a pebble beach.", "params": {"duration": "3"}}


class FullDisk(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def task(configure_emulator):
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0, result_min_bytes=VIDEO_BYTES)
    with RivyaClient(TEST_API_KEY, emulator.base_url) as client:
        created = client.create_generation(BODY, idempotency_key="delivery-test")
        return client.get_generation(created.id)


@pytest.fixture
def store(s3_bucket, s3_endpoint_url) -> VideoStore:
    client, bucket = s3_bucket
    return VideoStore(client, bucket, "videos", chunk_bytes=MIN_PART_BYTES, endpoint_url=s3_endpoint_url)


def test_the_probe_copy_holds_every_byte_that_was_stored(task, store, tmp_path: Path):
    copy_path = tmp_path / "copy.mp4"
    with (
        MediaFetcher(allow_local=True) as fetcher,
        fetcher.open(task.result.video_url) as stream,
        copy_path.open("wb") as copy,
        _TeeReader(stream, copy) as tee,
    ):
        stored = store.store_video("beach", task.id, tee)

    assert stored.size_bytes == VIDEO_BYTES
    assert hashlib.sha256(copy_path.read_bytes()).hexdigest() == stored.sha256 == store.object_sha256(stored.key)


def test_a_failed_copy_write_stops_the_upload_and_stores_nothing(task, store, s3_bucket):
    with (
        MediaFetcher(allow_local=True) as fetcher,
        fetcher.open(task.result.video_url) as stream,
        pytest.raises(OSError, match="No space left"),
        _TeeReader(stream, FullDisk()) as tee,
    ):
        store.store_video("beach", task.id, tee)

    client, bucket = s3_bucket
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)
    assert store.open_multipart_uploads() == []


def test_delivery_stores_a_multipart_video_that_probes_and_hashes_right(task, store):
    with MediaFetcher(allow_local=True) as fetcher:
        delivery = deliver_video(task=task, brief_id="beach", fetcher=fetcher, store=store, lineage={})

    assert delivery.video.size_bytes == VIDEO_BYTES
    assert delivery.stored_sha256 == delivery.video.sha256
    assert delivery.probe is not None and round(delivery.probe.duration_seconds) == 3


def test_delivery_stores_poster_and_sheet_next_to_the_video_and_names_them_in_the_sidecar(task, store, s3_bucket):
    with MediaFetcher(allow_local=True) as fetcher:
        delivery = deliver_video(task=task, brief_id="beach", fetcher=fetcher, store=store, lineage={})

    client, bucket = s3_bucket
    assert (delivery.poster.key, delivery.sheet.key) == (
        f"videos/beach/{task.id}.poster.jpg",
        f"videos/beach/{task.id}.sheet.jpg",
    )
    pictures = delivery.inspection.pictures
    for stored, picture in ((delivery.poster, pictures.poster), (delivery.sheet, pictures.sheet)):
        response = client.get_object(Bucket=bucket, Key=stored.key)
        body = response["Body"].read()
        assert response["ContentType"] == "image/jpeg" and body == picture.jpeg
        assert hashlib.sha256(body).hexdigest() == stored.sha256
        assert Image.open(io.BytesIO(body)).size == (picture.width, picture.height)
    sidecar = json.loads(client.get_object(Bucket=bucket, Key=delivery.sidecar.key)["Body"].read())
    assert sidecar["poster"] == {
        "uri": delivery.poster.uri,
        "sha256": delivery.poster.sha256,
        "width": 640,
        "height": 360,
        "at_seconds": [1.5],
    }
    assert sidecar["sheet"]["uri"] == delivery.sheet.uri and len(sidecar["sheet"]["at_seconds"]) == 6
    assert sidecar["qc"]["audio_present"] is False and sidecar["qc"]["longest_frozen_seconds"] == 0.0
    assert sidecar["probe"]["frames"] == delivery.probe.frames
    # The hash still covers the video alone, and the pictures came from the same bytes.
    assert sidecar["sha256"] == delivery.video.sha256 == delivery.stored_sha256


def test_a_result_that_is_no_video_is_stored_without_pictures(task, store, s3_bucket, tmp_path, emulator):
    sound_only = tmp_path / "sound.wav"
    with wave.open(str(sound_only), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(bytes(16000))
    with RivyaClient(TEST_API_KEY, emulator.base_url) as client:
        uploaded = client.upload_file(sound_only, kind="audio", mime_type="audio/wav")
    not_a_video = task.model_copy(update={"result": task.result.model_copy(update={"primary_url": uploaded.url})})

    with MediaFetcher(allow_local=True) as fetcher:
        delivery = deliver_video(task=not_a_video, brief_id="beach", fetcher=fetcher, store=store, lineage={})

    client, bucket = s3_bucket
    assert delivery.inspection is None and delivery.probe is None and delivery.probe_error == "no video stream"
    assert delivery.poster is None and delivery.sheet is None
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {delivery.video.key, delivery.sidecar.key}
    sidecar = json.loads(client.get_object(Bucket=bucket, Key=delivery.sidecar.key)["Body"].read())
    assert sidecar["poster"] is None and sidecar["sheet"] is None and sidecar["qc"] is None
