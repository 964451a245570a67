"""What QC measures while the probe decodes a video: black and frozen stretches from the luma of sampled
frames, and the level of the whole audio track. Each meter takes frames one at a time and keeps only a
couple of small luma samples, so memory does not grow with the clip's length or resolution.

The black and frozen rules follow FFmpeg's `blackdetect` and `freezedetect`, computed on a regular subsample of
the luma plane (every n-th pixel of every n-th row), which estimates the whole frame's pixel shares and mean
differences without bias. `freezedetect` also compares chroma; a picture that holds still in luma while its
colours change is rare enough to leave out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import av
import numpy as np

from .thresholds import QcThresholds

SAMPLES_PER_SECOND = 4.0  # frames analysed per second of video, whatever its frame rate
LUMA_SAMPLE_COLUMNS = 256  # about this many luma columns (and as many rows, in proportion) per sampled frame
SILENCE_FLOOR_DBFS = -120.0  # the level reported for digital silence (its log would be minus infinity)
_JPEG_RANGE = 2  # AVCOL_RANGE_JPEG: luma spans 0-255 instead of 16-235
# Pixel formats whose first plane is 8-bit luma, readable without any conversion.
_EIGHT_BIT_LUMA = frozenset(
    f"{prefix}{layout}"
    for prefix in ("yuv", "yuvj", "yuva")
    for layout in ("420p", "422p", "444p", "440p", "411p", "410p")
) | {"nv12", "nv21", "nv16", "gray"}


@dataclass(frozen=True)
class QcMeasurements:
    """What one pass over a video measured. Times are seconds of the clip; `None` levels mean no audio stream."""

    audio_present: bool
    audio_rms_dbfs: float | None
    audio_peak_dbfs: float | None
    audio_seconds: float
    longest_black_seconds: float
    black_fraction: float
    longest_frozen_seconds: float
    analysed_seconds: float
    sampled_frames: int


class LumaMeter:
    """Black and frozen stretches, from frames sampled SAMPLES_PER_SECOND times a second.

    As in FFmpeg, a black stretch runs from its first black frame to the first frame that is not black, and a
    frozen stretch from the frame the others match (the reference) to the first one that differs from it;
    a stretch still open at the end runs to the end of the clip.
    """

    def __init__(self, thresholds: QcThresholds) -> None:
        self._thresholds = thresholds
        # The highest luma that is black: blackdetect's pix_th, scaled to JPEG range (True) or video range.
        pixel = thresholds.black_pixel_luma
        self._black_levels = {True: int(pixel * 255), False: int(16 + pixel * (235 - 16))}
        self._freeze_tolerance = 10 ** (thresholds.freeze_noise_db / 20)  # freezedetect's n, as a share of 256
        self._next_sample_at = 0.0
        self._black_since: float | None = None
        self._reference: np.ndarray | None = None
        self._reference_at = 0.0
        self._frozen_since_reference = False
        self.end_at = 0.0
        self.sampled_frames = 0
        self.longest_black = 0.0
        self.black_total = 0.0
        self.longest_frozen = 0.0

    def offer(self, frame: av.VideoFrame, at: float, frame_seconds: float) -> None:
        """A decoded frame shown from `at` for `frame_seconds`; only the sampled ones are looked at."""
        self.end_at = max(self.end_at, at + frame_seconds)
        if at < self._next_sample_at:
            return
        self._next_sample_at = (math.floor(at * SAMPLES_PER_SECOND) + 1) / SAMPLES_PER_SECOND
        self.sampled_frames += 1
        luma, full_range = luma_sample(frame)
        black_share = float(np.count_nonzero(luma <= self._black_levels[full_range])) / luma.size
        self._track_black(at, black_share)
        self._track_freeze(at, luma)

    def finish(self) -> None:
        """Close the stretches still open: they last until the clip ends."""
        if self._black_since is not None:
            self._end_black(self._black_since, self.end_at)
        if self._frozen_since_reference:
            self.longest_frozen = max(self.longest_frozen, self.end_at - self._reference_at)

    def _track_black(self, at: float, black_share: float) -> None:
        black = black_share >= self._thresholds.black_picture_share
        if black and self._black_since is None:
            self._black_since = at
        elif not black and self._black_since is not None:
            self._end_black(self._black_since, at)

    def _end_black(self, since: float, at: float) -> None:
        length = at - since
        self.longest_black = max(self.longest_black, length)
        self.black_total += length
        self._black_since = None

    def _track_freeze(self, at: float, luma: np.ndarray) -> None:
        if self._reference is not None and self._reference.shape == luma.shape:
            difference = float(np.mean(np.abs(luma.astype(np.int16) - self._reference))) / 256
            if difference <= self._freeze_tolerance:
                self._frozen_since_reference = True
                return
            if self._frozen_since_reference:
                self.longest_frozen = max(self.longest_frozen, at - self._reference_at)
        self._reference, self._reference_at, self._frozen_since_reference = luma, at, False


def luma_sample(frame: av.VideoFrame) -> tuple[np.ndarray, bool]:
    """Every n-th luma pixel of every n-th row (a copy, about LUMA_SAMPLE_COLUMNS wide), and whether luma spans
    0-255 (JPEG range) rather than video range's 16-235."""
    if frame.format.name not in _EIGHT_BIT_LUMA:  # 10-bit, RGB, packed YUV: rare enough to pay a conversion
        frame = frame.reformat(format="yuv420p")
    plane = frame.planes[0]
    rows = np.frombuffer(  # pyright: ignore[reportCallIssue]: PyAV's stub leaves out a plane's buffer protocol
        plane,  # pyright: ignore[reportArgumentType]
        dtype=np.uint8,
        count=plane.height * plane.line_size,
    )
    rows = rows.reshape(plane.height, plane.line_size)[:, : plane.width]
    step = max(1, plane.width // LUMA_SAMPLE_COLUMNS)
    full_range = frame.color_range == _JPEG_RANGE or frame.format.name.startswith("yuvj")
    return rows[::step, ::step].copy(), full_range


class AudioMeter:
    """RMS and peak level over every decoded sample of an audio track, in dBFS (a full-scale sine is -3 dBFS)."""

    def __init__(self) -> None:
        self._sum_of_squares = 0.0
        self._samples = 0
        self._peak = 0.0
        self.seconds = 0.0

    def add(self, frame: av.AudioFrame) -> None:
        samples: np.ndarray = frame.to_ndarray()  # any sample format, told apart by dtype below
        if samples.dtype == np.uint8:  # FFmpeg's only unsigned sample format: silence is 128
            samples = samples.astype(np.float64) / 128 - 1
        elif np.issubdtype(samples.dtype, np.integer):
            samples = samples.astype(np.float64) / -np.iinfo(samples.dtype).min
        flat = samples.reshape(-1).astype(np.float64, copy=False)
        self._sum_of_squares += float(np.dot(flat, flat))
        self._samples += flat.size
        if flat.size:
            self._peak = max(self._peak, float(np.max(np.abs(flat))))
        self.seconds += frame.samples / frame.sample_rate if frame.sample_rate else 0.0

    def rms_dbfs(self) -> float:
        return _dbfs(math.sqrt(self._sum_of_squares / self._samples) if self._samples else 0.0)

    def peak_dbfs(self) -> float:
        return _dbfs(self._peak)


def _dbfs(level: float) -> float:
    return round(max(SILENCE_FLOOR_DBFS, 20 * math.log10(level)) if level > 0 else SILENCE_FLOOR_DBFS, 2)
