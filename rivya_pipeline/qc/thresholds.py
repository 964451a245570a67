"""The thresholds of the QC checks: settings with FFmpeg's defaults, named in each check's metadata."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class QcThresholds(BaseModel):
    """Where each QC check draws its line. The defaults follow FFmpeg's `blackdetect` (pix_th, pic_th, d),
    `freezedetect` (n, d) and `silencedetect` (n); every value is named in the check's metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    black_pixel_luma: float = Field(
        default=0.10, ge=0.0, le=1.0, description="blackdetect pix_th: a pixel is black at or below this luma share"
    )
    black_picture_share: float = Field(
        default=0.98, ge=0.0, le=1.0, description="blackdetect pic_th: a frame is black when this share is black"
    )
    black_max_seconds: float = Field(
        default=2.0, gt=0.0, description="blackdetect d: not_black fails on a black stretch this long"
    )
    black_max_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="not_black fails when this share of the clip is black in all"
    )
    freeze_noise_db: float = Field(
        default=-60.0, le=0.0, description="freezedetect n: frames differing by less than this are the same"
    )
    freeze_max_seconds: float = Field(
        default=2.0, gt=0.0, description="freezedetect d: not_frozen fails on a frozen stretch this long"
    )
    silence_max_dbfs: float = Field(
        default=-60.0, le=0.0, description="silencedetect n: audio_matches fails on a track whose RMS is this low"
    )

    def metadata(self, *names: str) -> dict[str, float]:
        """The named thresholds, keyed as check metadata (`threshold.<name>`)."""
        return {f"threshold.{name}": getattr(self, name) for name in names}
