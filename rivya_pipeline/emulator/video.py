"""Real, tiny H.264 MP4 results whose duration and aspect ratio match the request, so that a client's
"is this really the video we asked for" checks run against a decodable file, optionally padded to any size."""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator

import av

# Even dimensions (yuv420p needs them), small enough to encode a 15 s clip in milliseconds.
DIMENSIONS_BY_ASPECT: dict[str, tuple[int, int]] = {"16:9": (64, 36), "9:16": (36, 64), "1:1": (48, 48)}
_PAD_CHUNK = bytes(1024 * 1024)
_MAX_32BIT_BOX = 0xFFFFFFFF


@functools.lru_cache(maxsize=64)
def encode_mp4(duration_seconds: int, aspect_ratio: str, fps: int) -> bytes:
    """A fading grey clip; cached because every task with the same shape gets the same bytes."""
    width, height = DIMENSIONS_BY_ASPECT[aspect_ratio]
    frame_count = duration_seconds * fps
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for index in range(frame_count):
            frame = av.VideoFrame(width, height, "yuv420p")
            shade = (index * 255) // max(1, frame_count - 1)
            for plane, value in zip(frame.planes, (shade, 128, 128), strict=True):
                plane.update(bytes([value]) * plane.buffer_size)
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


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
