"""Is this file really the video we asked for, and is it worth watching? One pass with PyAV (FFmpeg, no binary)
decodes every video frame (so a broken one fails the probe) and all of the audio; QC looks at a few sampled
frames per second, and the poster and the contact sheet are taken as the decode passes their moments."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
from av.container import InputContainer
from av.error import FFmpegError

from .qc.thresholds import QcThresholds

if TYPE_CHECKING:
    from .qc.measures import QcMeasurements
    from .qc.pictures import VideoPictures

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


@dataclass(frozen=True)
class DecodeCounts:
    """What the pass read and did, to show that it read the file once and looked closely at a sample only."""

    packets: int
    video_frames: int
    audio_frames: int
    sampled_frames: int


@dataclass(frozen=True)
class VideoInspection:
    """Everything one pass over a video yields. `pictures` is None when no frame decoded."""

    probe: VideoProbe
    qc: QcMeasurements
    pictures: VideoPictures | None
    counts: DecodeCounts


class ProbeError(Exception):
    """The file does not decode as a video."""


def inspect_video(path: Path, thresholds: QcThresholds | None = None) -> VideoInspection:
    """Probe, QC measurements and pictures of the video at `path`, from one demux and decode of the file."""
    thresholds = thresholds or QcThresholds()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ProbeError("no video stream")
            return _inspect(container, thresholds)
    except FFmpegError as exc:
        raise ProbeError(f"not a decodable video: {exc}") from None


def _inspect(container: InputContainer, thresholds: QcThresholds) -> VideoInspection:
    # numpy and Pillow load on the first pass, not with this module: a delivery imports it, and holding them
    # while its multipart parts are in memory would raise the delivery's peak RSS.
    from .qc.measures import AudioMeter, LumaMeter, QcMeasurements
    from .qc.pictures import PictureTaker

    video = container.streams.video[0]
    audio = container.streams.audio[0] if container.streams.audio else None
    if video.duration is not None and video.time_base is not None:
        duration = float(video.duration * video.time_base)
    else:
        duration = (container.duration or 0) / av.time_base
    frame_seconds = 1 / float(video.average_rate) if video.average_rate else 0.0
    luma, sound, pictures = LumaMeter(thresholds), AudioMeter() if audio else None, PictureTaker(duration)
    packets = video_frames = audio_frames = 0
    first_at: float | None = None
    for packet in container.demux(*(stream for stream in (video, audio) if stream is not None)):
        packets += packet.size > 0  # the empty packets that flush each decoder are not part of the file
        for frame in packet.decode():
            if isinstance(frame, av.VideoFrame):  # only the video and audio streams are demuxed
                at = frame.time if frame.time is not None else video_frames * frame_seconds
                first_at = at if first_at is None else first_at
                video_frames += 1
                luma.offer(frame, at - first_at, frame_seconds)
                pictures.offer(frame, at - first_at)
            elif isinstance(frame, av.AudioFrame) and sound is not None:
                audio_frames += 1
                sound.add(frame)
    luma.finish()
    probe = VideoProbe(
        container=container.format.name,
        codec=video.codec_context.name,
        width=video.codec_context.width,
        height=video.codec_context.height,
        duration_seconds=round(duration, 3),
        frames=video_frames,
    )
    qc = QcMeasurements(
        audio_present=audio is not None,
        audio_rms_dbfs=sound.rms_dbfs() if sound else None,
        audio_peak_dbfs=sound.peak_dbfs() if sound else None,
        audio_seconds=round(sound.seconds, 3) if sound else 0.0,
        longest_black_seconds=round(luma.longest_black, 3),
        black_fraction=round(luma.black_total / luma.end_at, 4) if luma.end_at else 0.0,
        longest_frozen_seconds=round(luma.longest_frozen, 3),
        analysed_seconds=round(luma.end_at, 3),
        sampled_frames=luma.sampled_frames,
    )
    counts = DecodeCounts(packets, video_frames, audio_frames, luma.sampled_frames)
    return VideoInspection(probe, qc, pictures.finish(), counts)
