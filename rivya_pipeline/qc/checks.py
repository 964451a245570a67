"""Pass or fail for each QC check, from one pass's measurements and the thresholds, with metadata that shows the
measured values next to the thresholds they were held against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .thresholds import QcThresholds

if TYPE_CHECKING:
    from .measures import QcMeasurements

AUDIO_MATCHES = "audio_matches"
NOT_BLACK = "not_black"
NOT_FROZEN = "not_frozen"
QC_CHECKS = (AUDIO_MATCHES, NOT_BLACK, NOT_FROZEN)

MetadataValue = float | int | str | bool


@dataclass(frozen=True)
class CheckVerdict:
    """One check's outcome: `measured` is a line for people (CLI, reports), `metadata` the figures behind it."""

    check: str
    passed: bool
    measured: str
    metadata: dict[str, MetadataValue]


def audio_matches(qc: QcMeasurements, *, sound_wanted: bool, thresholds: QcThresholds) -> CheckVerdict:
    """An audio stream exactly when sound was asked for, and then not silent (RMS over the whole track)."""
    metadata: dict[str, MetadataValue] = {"sound_wanted": sound_wanted, "audio_present": qc.audio_present}
    if qc.audio_rms_dbfs is not None and qc.audio_peak_dbfs is not None:  # None exactly when no audio stream
        metadata |= {"audio_rms_dbfs": qc.audio_rms_dbfs, "audio_peak_dbfs": qc.audio_peak_dbfs}
    metadata |= thresholds.metadata("silence_max_dbfs")
    if qc.audio_rms_dbfs is None:
        passed = not sound_wanted
        measured = "no audio stream" + ("; sound was asked for" if sound_wanted else "")
    elif not sound_wanted:
        passed, measured = False, "an audio stream; no sound was asked for"
    else:
        passed = qc.audio_rms_dbfs > thresholds.silence_max_dbfs
        silent = "" if passed else f"silent: at or below {thresholds.silence_max_dbfs:g} dBFS; "
        measured = f"{silent}audio RMS {qc.audio_rms_dbfs:g} dBFS"
    return CheckVerdict(AUDIO_MATCHES, passed, measured, metadata)


def not_black(qc: QcMeasurements, thresholds: QcThresholds) -> CheckVerdict:
    """No black stretch as long as `black_max_seconds`, and less than `black_max_fraction` of the clip black."""
    passed = (
        qc.longest_black_seconds < thresholds.black_max_seconds and qc.black_fraction < thresholds.black_max_fraction
    )
    measured = f"longest black stretch {qc.longest_black_seconds:.1f} s, {qc.black_fraction:.0%} of the clip black"
    metadata = {
        "longest_black_seconds": qc.longest_black_seconds,
        "black_fraction": qc.black_fraction,
        "sampled_frames": qc.sampled_frames,
        **thresholds.metadata("black_max_seconds", "black_max_fraction", "black_pixel_luma", "black_picture_share"),
    }
    return CheckVerdict(NOT_BLACK, passed, measured, metadata)


def not_frozen(qc: QcMeasurements, thresholds: QcThresholds) -> CheckVerdict:
    """No stretch of near-identical frames as long as `freeze_max_seconds`."""
    passed = qc.longest_frozen_seconds < thresholds.freeze_max_seconds
    measured = f"longest frozen stretch {qc.longest_frozen_seconds:.1f} s"
    metadata = {
        "longest_frozen_seconds": qc.longest_frozen_seconds,
        "sampled_frames": qc.sampled_frames,
        **thresholds.metadata("freeze_max_seconds", "freeze_noise_db"),
    }
    return CheckVerdict(NOT_FROZEN, passed, measured, metadata)


def qc_verdicts(qc: QcMeasurements, *, sound_wanted: bool, thresholds: QcThresholds) -> list[CheckVerdict]:
    """Every QC check, in QC_CHECKS order."""
    return [
        audio_matches(qc, sound_wanted=sound_wanted, thresholds=thresholds),
        not_black(qc, thresholds),
        not_frozen(qc, thresholds),
    ]
