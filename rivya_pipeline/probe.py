"""Is this file really the video we asked for? Probed with PyAV (FFmpeg), decoding every frame."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

ASPECT_TOLERANCE = 0.02


@dataclass(frozen=True)
class VideoProbe:
    container: str
    codec: str
    width: int
    height: int
    duration_seconds: float
    frames: int

    @property
    def resolution(self) -> str:
        return f"{self.width}x{self.height}"

    def matches_aspect(self, aspect_ratio: str) -> bool:
        """`16:9`-style ratio against the frame size, within 2% (encoders round to even sizes)."""
        wanted_w, wanted_h = (int(x) for x in aspect_ratio.split(":"))
        wanted, actual = Fraction(wanted_w, wanted_h), Fraction(self.width, self.height)
        return abs(float(actual / wanted) - 1.0) <= ASPECT_TOLERANCE


class ProbeError(Exception):
    """The file does not decode as a video."""


def probe_video(path: Path) -> VideoProbe:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ProbeError("no video stream")
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(stream))
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / av.time_base
            return VideoProbe(
                container=container.format.name,
                codec=stream.codec_context.name,
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                duration_seconds=round(duration, 3),
                frames=frames,
            )
    except av.FFmpegError as exc:
        raise ProbeError(f"not a decodable video: {exc}") from None
