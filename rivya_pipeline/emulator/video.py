"""Real H.264 MP4 results shaped like the request (duration, aspect ratio, the mode's resolution, sound), with
motion, colour and a tone that video QC can judge, or a faulty clip on demand; optionally padded to any size."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import av
import numpy as np
from av.audio.stream import AudioStream
from av.container import OutputContainer

from .config import VideoFault

# Even dimensions (yuv420p needs them): about 480p for `std`, 720p for `pro`; models without a mode get `std`.
FRAME_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "std": {"16:9": (854, 480), "9:16": (480, 854), "1:1": (480, 480)},
    "pro": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (720, 720)},
}
# 4:3, which no catalog model offers: the `wrong_aspect` fault.
WRONG_ASPECT_SIZES: dict[str, tuple[int, int]] = {"std": (640, 480), "pro": (960, 720)}
DEFAULT_MODE = "std"
AUDIO_RATE = 48_000
TONE_AMPLITUDE = 0.25  # about -15 dBFS RMS: clearly sound, far from clipping
_TONE_NOTES_HZ = (220.0, 277.2, 329.6, 440.0)  # an A major arpeggio, one note every half second
_AUDIO_CHUNK = 1024  # samples per AAC frame
_PAD_CHUNK = bytes(1024 * 1024)
_MAX_32BIT_BOX = 0xFFFFFFFF

Picture = Literal["moving", "frozen", "black"]
Sound = Literal["tone", "silence"]


@dataclass(frozen=True)
class ResultShape:
    """What a succeeded task's video is made of, read off its params and any video fault it was given."""

    duration_seconds: int
    aspect_ratio: str
    mode: str = DEFAULT_MODE
    sound: bool = False
    fault: VideoFault | None = None

    def encode(self, fps: int) -> bytes:
        return encode_mp4(
            self.duration_seconds, self.aspect_ratio, fps, mode=self.mode, sound=self.sound, fault=self.fault
        )


@functools.lru_cache(maxsize=64)
def encode_mp4(
    duration_seconds: int,
    aspect_ratio: str,
    fps: int,
    *,
    mode: str = DEFAULT_MODE,
    sound: bool = False,
    fault: VideoFault | None = None,
) -> bytes:
    """The result video of a task; cached because every task of the same shape and fault gets the same bytes."""
    size = WRONG_ASPECT_SIZES[mode] if fault == "wrong_aspect" else FRAME_SIZES[mode][aspect_ratio]
    picture: Picture = "black" if fault == "black" else "frozen" if fault == "frozen" else "moving"
    track: Sound | None = "silence" if fault == "silent" else "tone" if sound and fault != "no_audio" else None
    buffer = io.BytesIO()
    write_clip(buffer, size, duration_seconds, fps, picture=picture, sound=track)
    return buffer.getvalue()


def write_clip(
    target: str | Path | IO[bytes],
    size: tuple[int, int],
    duration_seconds: float,
    fps: int,
    *,
    picture: Picture = "moving",
    sound: Sound | None = None,
    preset: str = "ultrafast",
) -> None:
    """An H.264 MP4 (and an interleaved AAC track when `sound` is given). `ultrafast` keeps test clips cheap to
    make; a slower preset (B-frames, CABAC) makes a clip that costs as much to decode as a real model's."""
    width, height = size
    frame_count = round(duration_seconds * fps)
    samples = _audio(sound, frame_count / fps) if sound else None
    destination = str(target) if isinstance(target, str | Path) else target
    with av.open(destination, mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        # A still picture is stored losslessly: lossy, x264 keeps refining it for a dozen frames, a second and a
        # half at 8 fps, and freezedetect's -60 dB tolerance rightly sees that as change.
        video.options = {"preset": preset, "crf": "0" if picture == "frozen" else "28"}
        audio = container.add_stream("aac", rate=AUDIO_RATE, layout="mono") if samples is not None else None
        scene = _Scene(width, height)
        fixed = {"moving": None, "frozen": scene.frame(0.0), "black": scene.black}[picture]
        written = 0
        for index in range(frame_count):
            pixels = scene.frame(index / fps) if fixed is None else fixed
            frame = av.VideoFrame.from_ndarray(pixels, format="yuv420p")
            frame.pts = index
            container.mux(video.encode(frame))
            # Interleaved like a real file: the sound up to the end of this frame.
            if audio is not None and samples is not None:
                written = _mux_audio(container, audio, samples, written, (index + 1) * AUDIO_RATE // fps)
        container.mux(video.encode())
        if audio is not None and samples is not None:
            _mux_audio(container, audio, samples, written, len(samples))
            container.mux(audio.encode())


class _Scene:
    """Diagonal bands that pan, a hue wheel that turns, and a bright block circling over them: motion in luma and
    chroma alike. Each frame is slices of bands drawn once (no per-pixel maths per frame), so clips stay cheap
    to make; the bands repeat every width, so the pan wraps round without a jump."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        chroma_width, chroma_height = width // 2, height // 2
        x = np.arange(2 * width, dtype=np.float32)[None, :]
        y = np.arange(height, dtype=np.float32)[:, None]
        self._luma_bands = (70 + 110 * (0.5 + 0.5 * np.sin(2 * np.pi * (2 * x / width + y / height)))).astype(np.uint8)
        cx = np.arange(2 * chroma_width, dtype=np.float32)[None, :]
        cy = np.arange(chroma_height, dtype=np.float32)[:, None]
        hue = 2 * np.pi * (cx / chroma_width + 0.5 * cy / chroma_height)
        self._u_wheel = (128 + 90 * np.cos(hue)).astype(np.uint8)
        self._v_wheel = (128 + 90 * np.sin(hue)).astype(np.uint8)
        self.black, (luma, u, v) = self._new_frame()
        luma[:], u[:], v[:] = 16, 128, 128  # limited-range black

    def frame(self, seconds: float) -> np.ndarray:
        pixels, (luma, u, v) = self._new_frame()
        pan = int(seconds * self.width / 4) % self.width  # a quarter of the width a second
        turn = int(seconds * self.width / 6) % (self.width // 2)
        luma[:] = self._luma_bands[:, pan : pan + self.width]
        u[:] = self._u_wheel[:, turn : turn + self.width // 2]
        v[:] = self._v_wheel[:, turn : turn + self.width // 2]
        side = min(self.width, self.height) // 5 // 2 * 2
        angle = 2 * math.pi * seconds / 3  # once round every three seconds
        left = int((self.width - side) * (0.5 + 0.4 * math.cos(angle))) // 2 * 2
        top = int((self.height - side) * (0.5 + 0.4 * math.sin(angle))) // 2 * 2
        luma[top : top + side, left : left + side] = 225
        u[top // 2 : (top + side) // 2, left // 2 : (left + side) // 2] = 64  # orange
        v[top // 2 : (top + side) // 2, left // 2 : (left + side) // 2] = 200
        return pixels

    def _new_frame(self) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """A frame in PyAV's flat yuv420p layout, and views of its Y, U and V planes."""
        pixels = np.empty((self.height * 3 // 2, self.width), dtype=np.uint8)
        flat = pixels.reshape(-1)
        luma_size, chroma_shape = self.width * self.height, (self.height // 2, self.width // 2)
        chroma_end = luma_size + chroma_shape[0] * chroma_shape[1]
        planes = (
            flat[:luma_size].reshape(self.height, self.width),
            flat[luma_size:chroma_end].reshape(chroma_shape),
            flat[chroma_end:].reshape(chroma_shape),
        )
        return pixels, planes


def _audio(sound: Sound, seconds: float) -> np.ndarray:
    """Mono float samples: an arpeggio at TONE_AMPLITUDE, or digital silence."""
    count = round(seconds * AUDIO_RATE)
    if sound == "silence":
        return np.zeros(count, dtype=np.float32)
    moments = np.arange(count, dtype=np.float64) / AUDIO_RATE
    notes = np.asarray(_TONE_NOTES_HZ)[(moments * 2).astype(int) % len(_TONE_NOTES_HZ)]
    phase = 2 * np.pi * np.cumsum(notes) / AUDIO_RATE  # continuous across notes: no clicks
    return (TONE_AMPLITUDE * np.sin(phase)).astype(np.float32)


def _mux_audio(
    container: OutputContainer,
    stream: AudioStream,
    samples: np.ndarray,
    start: int,
    end: int,
) -> int:
    """Encode samples[start:end] in AAC-sized frames and mux them; returns where the next call starts."""
    for offset in range(start, end, _AUDIO_CHUNK):
        chunk = samples[offset : min(offset + _AUDIO_CHUNK, end)]
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = AUDIO_RATE, offset
        container.mux(stream.encode(frame))
    return max(start, end)


def free_box_header(box_size: int) -> bytes:
    """Header of an ISO-BMFF `free` box of `box_size` bytes (header included); players skip such boxes."""
    if box_size <= _MAX_32BIT_BOX:
        return box_size.to_bytes(4, "big") + b"free"
    return (1).to_bytes(4, "big") + b"free" + box_size.to_bytes(8, "big")


def padded_size(video_size: int, min_bytes: int) -> int:
    """Total size served: the video alone, or padded up to `min_bytes` (a box needs at least 8 bytes)."""
    if min_bytes <= video_size:
        return video_size
    return video_size + max(8, min_bytes - video_size)


def iter_padded(video: bytes, total_size: int) -> Iterator[bytes]:
    """The video then a `free` box up to `total_size`, generated chunk by chunk (never held in memory)."""
    yield video
    box_size = total_size - len(video)
    if box_size <= 0:
        return
    header = free_box_header(box_size)
    yield header
    remaining = box_size - len(header)
    while remaining > 0:
        chunk = _PAD_CHUNK if remaining >= len(_PAD_CHUNK) else _PAD_CHUNK[:remaining]
        remaining -= len(chunk)
        yield chunk
