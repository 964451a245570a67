"""`bench transfer`: a large result video from the emulator's media host into S3 through `stored_video`'s code
path (`deliver_video` with the media fetcher and the video store), against boto3's `upload_file` of the same
bytes from disk.

Each side runs in a child process that does nothing but its transfer (`bench.transfer_child`), with the
emulator and S3 in processes of their own, so its peak RSS is the transfer's alone. The child
imports no Dagster (a Dagster run process holds much more before it transfers anything);
`rss_before_transfer_mb` is what its imports and clients hold, so the rest of the peak is the transfer's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from ..rivya import GenerationTask
from .common import TASK_BODY, BenchResult
from .stack import BENCH_BUCKET, BenchStack

FULL_BYTES = 1024**3
QUICK_BYTES = 64 * 1024**2
RSS_GOAL_MB = 150


def _in_child(kind: str, job: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "rivya_pipeline.bench.transfer_child", kind],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"transfer child ({kind}) failed:\n{done.stderr}")
    sys.stderr.write(done.stderr)  # the delivery's progress lines (percent and MB/s)
    return json.loads(done.stdout)


def _video_url(task: GenerationTask) -> str:
    url = task.result.video_url if task.result is not None else None
    if url is None:
        raise RuntimeError(f"task {task.id} ended {task.status} without a video")
    return url


def run(stack: BenchStack, quick: bool, mebibytes: int | None = None) -> BenchResult:
    size = mebibytes * 1024**2 if mebibytes else QUICK_BYTES if quick else FULL_BYTES
    stack.configure(queued_seconds=0, processing_seconds=0, result_min_bytes=size)
    with stack.client() as client:
        task = client.create_generation(TASK_BODY, idempotency_key="bench-transfer")
        task = client.get_generation(task.id)
    job = {"task": task.model_dump(mode="json"), "s3_url": stack.s3_url, "bucket": BENCH_BUCKET}
    try:
        pipeline = _in_child("deliver", job)
        stack.empty_bucket()
        with tempfile.TemporaryDirectory(prefix="rivya-bench-transfer-") as tmp:
            path = Path(tmp) / "video.mp4"
            with httpx.stream("GET", _video_url(task), timeout=60) as response, path.open("wb") as copy:
                for chunk in response.iter_bytes(1024**2):
                    copy.write(chunk)
            baseline = _in_child("upload_file", job | {"path": str(path)})
    finally:
        stack.empty_bucket()
    megabytes = pipeline["bytes"] / 1e6
    mb_per_s = megabytes / pipeline["seconds"]
    baseline_mb_per_s = size / 1e6 / baseline["seconds"]
    ratio = mb_per_s / baseline_mb_per_s
    peak_rss_mb = pipeline["peak_rss_mb"]
    return BenchResult(
        name="transfer",
        setup=f"{size / 1024**2:.0f} MiB result video, media host -> deliver_video -> S3 (moto), vs boto3 upload_file",
        figures={
            "peak_rss_mb": round(peak_rss_mb, 1),
            "rss_before_transfer_mb": round(pipeline["rss_before_mb"], 1),
            "mb_per_s": round(mb_per_s, 1),
            "baseline_mb_per_s": round(baseline_mb_per_s, 1),
            "ratio": round(ratio, 2),
            "bytes": pipeline["bytes"],
            "seconds": round(pipeline["seconds"], 2),
            "baseline_seconds": round(baseline["seconds"], 2),
            "baseline_peak_rss_mb": round(baseline["peak_rss_mb"], 1),
            "sha256_matches": pipeline["sha256_matches"],
            "decodable": pipeline["decodable"],
        },
        goals=[
            (f"peak RSS <= {RSS_GOAL_MB} MB ({peak_rss_mb:.0f} MB)", peak_rss_mb <= RSS_GOAL_MB),
            (f"throughput >= 0.5x upload_file ({ratio:.2f}x)", ratio >= 0.5),
            ("stored bytes hash to what was received", pipeline["sha256_matches"]),
            ("the stored video decodes", pipeline["decodable"]),
        ],
        bounds="loopback and CPU: every byte crosses three processes (media host, this one, moto), is hashed twice "
        "(on the way in, and read back from S3 to check), and copied to disk for the probe",
    )
