"""A video's poster frame (from the middle) and contact sheet (frames across the clip, each with its timestamp),
taken from the probe's single decode as it passes their moments, plus small copies that fit a data URI: the
Dagster UI shows `data:image/jpeg;base64,...` images in Markdown metadata, whoever may read the bucket."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import av
from PIL import Image, ImageDraw, ImageFont

POSTER_LONG_SIDE = 640
SHEET_FRAMES = 6
SHEET_COLUMNS = 3
TILE_LONG_SIDE = 320
SHEET_GAP = 4
JPEG_QUALITY = 85
POSTER_THUMBNAIL_LONG_SIDE = 240
SHEET_THUMBNAIL_LONG_SIDE = 480
INLINE_MAX_BYTES = 8_000  # a data URI in every stored video's materialization: the event log keeps it forever
_INLINE_QUALITIES = (80, 65, 50, 35, 20)
_SHEET_BACKGROUND = (24, 24, 24)
_POSTER = -1  # the poster's place among the planned moments; the sheet's tiles are 0, 1, ...


@dataclass(frozen=True)
class Picture:
    """A JPEG, its size, the moments of the clip it shows, and a copy small enough to inline."""

    jpeg: bytes
    width: int
    height: int
    at_seconds: tuple[float, ...]
    thumbnail_jpeg: bytes

    def thumbnail_data_uri(self) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(self.thumbnail_jpeg).decode("ascii")


@dataclass(frozen=True)
class VideoPictures:
    poster: Picture
    sheet: Picture


class PictureTaker:
    """Takes the first frame at or after each planned moment as the decode passes it, already downscaled, so it
    holds a few small images and never a decoded frame beyond the latest. The moments follow the duration the
    container declares; a moment past the last frame gets the last frame."""

    def __init__(self, declared_seconds: float) -> None:
        span = max(declared_seconds, 0.0)
        tile_moments = [(index + 0.5) * span / SHEET_FRAMES for index in range(SHEET_FRAMES)]
        self._wanted = sorted([(span / 2, _POSTER)] + [(at, index) for index, at in enumerate(tile_moments)])
        self._taken: dict[int, tuple[Image.Image, float]] = {}  # image and moment, by role (_POSTER or a tile)
        self._last: tuple[av.VideoFrame, float] | None = None

    def offer(self, frame: av.VideoFrame, at: float) -> None:
        while self._wanted and self._wanted[0][0] <= at:
            self._take(self._wanted.pop(0)[1], frame, at)
        self._last = (frame, at)

    def finish(self) -> VideoPictures | None:
        """The poster and the sheet, or None when no frame was decoded."""
        if self._last is None:
            return None
        while self._wanted:
            self._take(self._wanted.pop(0)[1], *self._last)
        self._last = None
        poster, poster_at = self._taken.pop(_POSTER)
        tiles = [self._taken[index] for index in sorted(self._taken)]
        return VideoPictures(
            poster=_picture(poster, (poster_at,), POSTER_THUMBNAIL_LONG_SIDE),
            sheet=_picture(_sheet(tiles), tuple(at for _, at in tiles), SHEET_THUMBNAIL_LONG_SIDE),
        )

    def _take(self, role: int, frame: av.VideoFrame, at: float) -> None:
        long_side = POSTER_LONG_SIDE if role == _POSTER else TILE_LONG_SIDE
        width, height = fitted(frame.width, frame.height, long_side)
        image = frame.to_image(width=width, height=height, interpolation="AREA")
        self._taken[role] = (image, at)


def fitted(width: int, height: int, long_side: int) -> tuple[int, int]:
    """`width` x `height` scaled down (never up) so that its longer side is at most `long_side`."""
    scale = min(1.0, long_side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def timestamp(seconds: float) -> str:
    """`0:02.5`: minutes and seconds to a tenth, as a sheet labels its frames."""
    minutes, rest = divmod(round(seconds, 1), 60)
    return f"{int(minutes)}:{rest:04.1f}"


def _sheet(tiles: list[tuple[Image.Image, float]]) -> Image.Image:
    tile_width, tile_height = tiles[0][0].size
    rows = math.ceil(len(tiles) / SHEET_COLUMNS)
    size = (
        SHEET_COLUMNS * tile_width + (SHEET_COLUMNS + 1) * SHEET_GAP,
        rows * tile_height + (rows + 1) * SHEET_GAP,
    )
    sheet = Image.new("RGB", size, _SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=max(12, tile_height // 10))
    for index, (image, at) in enumerate(tiles):
        row, column = divmod(index, SHEET_COLUMNS)
        left = SHEET_GAP + column * (tile_width + SHEET_GAP)
        top = SHEET_GAP + row * (tile_height + SHEET_GAP)
        sheet.paste(
            image if image.size == (tile_width, tile_height) else image.resize((tile_width, tile_height)), (left, top)
        )
        corner = (left + 6, top + tile_height - 6)
        box = draw.textbbox(corner, timestamp(at), font=font, anchor="ld")
        draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
        draw.text(corner, timestamp(at), font=font, fill=(255, 255, 255), anchor="ld")
    return sheet


def _picture(image: Image.Image, at_seconds: tuple[float, ...], thumbnail_long_side: int) -> Picture:
    thumbnail = image.resize(fitted(*image.size, thumbnail_long_side), Image.Resampling.LANCZOS)
    return Picture(
        jpeg=_jpeg(image, JPEG_QUALITY),
        width=image.width,
        height=image.height,
        at_seconds=tuple(round(at, 3) for at in at_seconds),
        thumbnail_jpeg=_inline_jpeg(thumbnail),
    )


def _inline_jpeg(image: Image.Image) -> bytes:
    """The best quality that keeps the JPEG within INLINE_MAX_BYTES (the lowest one tried, if none does)."""
    for quality in _INLINE_QUALITIES:
        data = _jpeg(image, quality)
        if len(data) <= INLINE_MAX_BYTES:
            return data
    return data


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
