"""`bench qc`: CPU seconds and peak RSS of the whole QC pass (`inspect_video`: probe, QC measurements, poster
and contact sheet, from one decode) on a 1080p H.264 clip with an AAC track, at two lengths, to show that the
cost per second of clip stays flat and the memory does not grow with the length.

Each pass runs in a child process that imports only the pass (`bench.qc_child`), so its CPU time and peak RSS
are the pass's own plus the interpreter and PyAV (`rss_before_qc_mb`; numpy and Pillow load during the pass,
as they do in a delivery). There is no baseline to run beside it: the goals are absolute. The clips are made
before and are not measured: x264's `veryfast` preset, whose B-frames and CABAC cost a decoder about what a
video model's output does (`--quick`: shorter clips with `ultrafast`, quick to make).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..emulator.video import write_clip
from .common import BenchResult
from .stack import BenchStack

FRAME_SIZE = (1920, 1080)
FPS = 30
FULL = {"seconds": (5, 15), "preset": "veryfast"}
QUICK = {"seconds": (2, 4), "preset": "ultrafast"}
CPU_GOAL = 1.0  # CPU seconds per second of clip
RSS_GOAL_MB = 150
RSS_GROWTH_LIMIT_MB = 10  # between the short and the long clip: decoder buffers and pictures, nothing per frame


def _in_child(path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "rivya_pipeline.bench.qc_child", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"qc child failed:\n{done.stderr}")
    return json.loads(done.stdout)


def run(stack: BenchStack, quick: bool) -> BenchResult:
    """`stack` is unused: QC reads a local file and needs no server."""
    plan = QUICK if quick else FULL
    short_seconds, long_seconds = plan["seconds"]
    with tempfile.TemporaryDirectory(prefix="rivya-bench-qc-") as tmp:
        passes = {}
        for seconds in (short_seconds, long_seconds):
            path = Path(tmp) / f"{seconds}s.mp4"
            write_clip(path, FRAME_SIZE, seconds, FPS, sound="tone", preset=plan["preset"])
            passes[seconds] = _in_child(path)
    short, long = passes[short_seconds], passes[long_seconds]
    per_second = long["cpu_seconds"] / long["clip_seconds"]
    short_per_second = short["cpu_seconds"] / short["clip_seconds"]
    growth_mb = long["peak_rss_mb"] - short["peak_rss_mb"]
    return BenchResult(
        name="qc",
        setup=f"{long['resolution']} H.264 ({plan['preset']}) {FPS} fps + AAC, {long_seconds} s and {short_seconds} s: "
        "inspect_video (probe, black/frozen/audio, poster, sheet) in a child process",
        figures={
            "cpu_seconds_per_clip_second": round(per_second, 3),
            "peak_rss_mb": round(long["peak_rss_mb"], 1),
            "rss_before_qc_mb": round(long["rss_before_mb"], 1),
            "cpu_seconds": round(long["cpu_seconds"], 2),
            "wall_seconds": round(long["wall_seconds"], 2),
            "clip_seconds": long["clip_seconds"],
            "decoded_frames": long["decoded_frames"],
            "sampled_frames": long["sampled_frames"],
            "short_clip_seconds": short["clip_seconds"],
            "short_cpu_seconds_per_clip_second": round(short_per_second, 3),
            "short_peak_rss_mb": round(short["peak_rss_mb"], 1),
            "checks_passed": long["checks_passed"] and short["checks_passed"],
        },
        goals=[
            (f"CPU <= {CPU_GOAL} s per clip second ({per_second:.2f})", per_second <= CPU_GOAL),
            (f"peak RSS <= {RSS_GOAL_MB} MB ({long['peak_rss_mb']:.0f} MB)", long["peak_rss_mb"] <= RSS_GOAL_MB),
            (
                f"no growth with length: {short_seconds} s -> {long_seconds} s, peak RSS within "
                f"{RSS_GROWTH_LIMIT_MB} MB ({growth_mb:+.1f} MB), CPU per clip second within the goal "
                f"({short_per_second:.2f} -> {per_second:.2f})",
                growth_mb <= RSS_GROWTH_LIMIT_MB and short_per_second <= CPU_GOAL,
            ),
            ("the clip passes every QC check and has pictures", long["checks_passed"] and long["pictures"]),
        ],
        bounds="CPU: H.264 decoding of every frame (FFmpeg, slice threads), which the probe needs to call a file "
        "decodable; the sampled analysis, the audio and the pictures are a small share",
    )
