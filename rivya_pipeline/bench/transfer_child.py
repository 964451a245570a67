"""`python -m rivya_pipeline.bench.transfer_child {deliver,upload_file}`: one side of `bench transfer`.

A process that only transfers: it reads its job (JSON) on stdin, imports just what the transfer needs (no
Dagster, no emulator, no SQLAlchemy), and prints its timing and peak RSS (JSON) on stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from ..delivery import deliver_video
from ..rivya import GenerationTask
from ..rivya.media import MediaFetcher
from ..settings import Settings
from ..storage import VideoStore, make_s3_client
from .memory import peak_rss_mb


def deliver(job: dict[str, Any]) -> dict[str, Any]:
    """What `stored_video` does once its task has succeeded, with the settings' defaults (chunk size, size cap)."""
    settings = Settings.from_env({})
    store = VideoStore(
        make_s3_client(endpoint_url=job["s3_url"], region="us-east-1"),
        job["bucket"],
        settings.s3_prefix,
        chunk_bytes=settings.s3_chunk_mb * 1024**2,
        endpoint_url=job["s3_url"],
    )
    task = GenerationTask.model_validate(job["task"])
    before = peak_rss_mb()
    with MediaFetcher(allow_local=True, max_bytes=settings.max_media_mb * 1_000_000) as fetcher:
        delivery = deliver_video(task=task, brief_id="bench-transfer", fetcher=fetcher, store=store, lineage={})
    return {
        "seconds": delivery.seconds,
        "bytes": delivery.video.size_bytes,
        "sha256_matches": delivery.stored_sha256 == delivery.video.sha256,
        "decodable": delivery.probe is not None,
        "rss_before_mb": before,
        "peak_rss_mb": peak_rss_mb(),
    }


def upload_file(job: dict[str, Any]) -> dict[str, Any]:
    """The baseline: boto3's own managed upload of a file on disk, with boto3's default settings."""
    client = make_s3_client(endpoint_url=job["s3_url"], region="us-east-1")
    before = peak_rss_mb()
    started = time.perf_counter()
    client.upload_file(job["path"], job["bucket"], "baseline/video.mp4")
    return {"seconds": time.perf_counter() - started, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("rivya_pipeline.delivery").setLevel(logging.INFO)  # progress: percent and MB/s
    work = deliver if sys.argv[1] == "deliver" else upload_file
    print(json.dumps(work(json.loads(sys.stdin.read()))))
