"""`python -m rivya_pipeline.bench.qc_child CLIP`: one QC pass for `bench qc`, in a process of its own.

It imports just the pass (no Dagster, no S3 client, no emulator) and prints, as JSON, the CPU seconds of every
thread of the process during the pass and the process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from ..probe import inspect_video
from ..qc.checks import qc_verdicts
from ..qc.thresholds import QcThresholds
from .memory import peak_rss_mb


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads: FFmpeg decodes slices in threads of its own
    return usage.ru_utime + usage.ru_stime


def measure(path: Path) -> dict[str, object]:
    before_rss, before_cpu, started = peak_rss_mb(), _cpu_seconds(), time.perf_counter()
    inspection = inspect_video(path)
    cpu_seconds, wall_seconds = _cpu_seconds() - before_cpu, time.perf_counter() - started
    verdicts = qc_verdicts(inspection.qc, sound_wanted=True, thresholds=QcThresholds())
    return {
        "cpu_seconds": cpu_seconds,
        "wall_seconds": wall_seconds,
        "rss_before_mb": before_rss,
        "peak_rss_mb": peak_rss_mb(),
        "clip_seconds": inspection.probe.duration_seconds,
        "resolution": inspection.probe.resolution,
        "decoded_frames": inspection.counts.video_frames,
        "sampled_frames": inspection.counts.sampled_frames,
        "audio_present": inspection.qc.audio_present,
        "checks_passed": all(verdict.passed for verdict in verdicts),
        "pictures": inspection.pictures is not None,
    }


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]))))
