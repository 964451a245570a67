"""Video QC in Dagster: the three QC checks of `stored_video`, the poster and contact sheet on its partition page,
and the failed checks read back from the instance for `rivya-pipeline run` and `report`.

The QC checks are not blocking: Dagster fails the step of a blocking check that fails with ERROR severity (after
the materialization is recorded), and a paid, stored video is kept and shown either way. Severity says how bad a
failure is: a black clip, or one without the sound that was paid for, is unusable (ERROR); a frozen stretch is a
heuristic that a still or slow shot may trip on purpose (WARN).

The pictures are inline `data:image/jpeg;base64,...` thumbnails in Markdown metadata, so they show with a private
bucket and never expire; a presigned link would expire within 7 days and stay in the event log, dead, forever.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    DagsterInstance,
    MetadataValue,
)
from dagster._core.storage.asset_check_execution_record import (  # not in dagster's public API
    AssetCheckExecutionRecord,
    AssetCheckExecutionRecordStatus,
)
from dagster._core.storage.event_log.base import EventLogStorage

from ..batching import chunks
from ..delivery import Delivery
from ..qc.checks import AUDIO_MATCHES, NOT_BLACK, NOT_FROZEN, qc_verdicts
from ..qc.thresholds import QcThresholds
from .events import STORED_VIDEO_CHECK_DESCRIPTIONS
from .inputs import TaskHandle

if TYPE_CHECKING:
    from ..qc.pictures import Picture
    from ..storage import StoredObject

STORED_VIDEO = AssetKey("stored_video")
REGENERATE_HINT = "the video is stored and paid for; bump `regenerate` in the brief to pay for a new one"


@dataclass(frozen=True)
class QcCheck:
    description: str
    severity: AssetCheckSeverity


QC_CHECKS = {
    AUDIO_MATCHES: QcCheck(
        "An audio stream exactly when the brief asked for sound, and then not silent (RMS over the whole track).",
        AssetCheckSeverity.ERROR,
    ),
    NOT_BLACK: QcCheck("No long stretch of black frames, and not mostly black.", AssetCheckSeverity.ERROR),
    NOT_FROZEN: QcCheck(
        "No long stretch of frozen frames (a warning: a still or slow shot may be meant).", AssetCheckSeverity.WARN
    ),
}


def sound_wanted(handle: TaskHandle) -> bool:
    return handle.params.get("sound") == "true"  # the API form of the brief's `sound: true`


def qc_check_results(delivery: Delivery, handle: TaskHandle, thresholds: QcThresholds) -> list[AssetCheckResult]:
    """Each QC check's verdict with the measured values and the thresholds; all fail when the video did not decode."""
    if delivery.inspection is None:
        measured = f"not inspected: {delivery.probe_error}"
        return [_result(name, False, {"measured": measured}) for name in QC_CHECKS]
    verdicts = qc_verdicts(delivery.inspection.qc, sound_wanted=sound_wanted(handle), thresholds=thresholds)
    return [_result(v.check, v.passed, {"measured": v.measured, **v.metadata}) for v in verdicts]


def _result(check: str, passed: bool, metadata: dict[str, Any]) -> AssetCheckResult:
    return AssetCheckResult(check_name=check, passed=passed, severity=QC_CHECKS[check].severity, metadata=metadata)


def picture_metadata(delivery: Delivery) -> dict[str, Any]:
    """The poster and the contact sheet as images (small inline copies), and where the full-size JPEGs are."""
    pictures = delivery.inspection.pictures if delivery.inspection else None
    if pictures is None or delivery.poster is None or delivery.sheet is None:
        return {}
    return {
        "poster": MetadataValue.md(_markdown("Poster", pictures.poster, delivery.poster)),
        "poster_uri": delivery.poster.uri,
        "contact_sheet": MetadataValue.md(_markdown("Contact sheet", pictures.sheet, delivery.sheet)),
        "contact_sheet_uri": delivery.sheet.uri,
    }


def _markdown(title: str, picture: Picture, stored: StoredObject) -> str:
    moments = ", ".join(f"{at:.1f} s" for at in picture.at_seconds)
    return (
        f"![{title}]({picture.thumbnail_data_uri()})\n\n"
        f"{title} at {moments}. Full size ({picture.width}x{picture.height}): [{stored.uri}]({stored.console_url})"
    )


PARTITIONS_PER_READ = 5000  # partition keys bound in one read of the checks' executions
HISTORY_PAGE = 1000  # failed executions of a check read at a time
FAILED = AssetCheckExecutionRecordStatus.FAILED


@dataclass(frozen=True)
class QcFailure:
    """A check the latest stored video of a brief failed, as `run` and `report` list it."""

    brief_id: str
    check: str
    severity: str
    measured: str
    hint: str = REGENERATE_HINT


def qc_failures(instance: DagsterInstance, brief_ids: Sequence[str] | None = None) -> list[QcFailure]:
    """The failed checks of each brief's latest stored video (of `brief_ids`, or of every brief), from the checks'
    evaluations in the instance's event log: the record the UI shows, so the CLI can never disagree with it.

    Indexed reads that follow the briefs in question, not the history: the latest execution of each check per
    partition (of `brief_ids` only), then the failed ones' evaluations, a read per check and HISTORY_PAGE failures;
    no run's log is read."""
    names = [*STORED_VIDEO_CHECK_DESCRIPTIONS, *QC_CHECKS]
    storage = instance.event_log_storage
    keys = [AssetCheckKey(STORED_VIDEO, name) for name in names]
    if brief_ids is None:
        infos = list(storage.get_asset_check_partition_info(keys))
    else:  # in chunks: a statement binds each partition key
        ids = list(brief_ids)
        infos = [
            info
            for chunk in chunks(ids, PARTITIONS_PER_READ)
            for info in storage.get_asset_check_partition_info(keys, partition_keys=chunk)
        ]
    failing: dict[AssetCheckKey, set[str]] = {}
    for info in infos:
        if info.latest_execution_status == FAILED and info.partition_key is not None:
            failing.setdefault(info.check_key, set()).add(info.partition_key)
    failures = []
    for check_key, partitions in failing.items():
        for record in _latest_failures(storage, check_key, partitions):
            event = record.event.dagster_event if record.event else None
            evaluation = event.event_specific_data if event else None
            if isinstance(evaluation, AssetCheckEvaluation) and record.partition is not None:
                failures.append(
                    QcFailure(record.partition, check_key.name, evaluation.severity.value, _measured(evaluation))
                )
    return sorted(failures, key=lambda f: (f.brief_id, names.index(f.check)))


def _latest_failures(
    storage: EventLogStorage, check_key: AssetCheckKey, partitions: set[str]
) -> Iterator[AssetCheckExecutionRecord]:
    """The newest failed execution of the check in each of `partitions` (whose latest execution failed, so it is that
    one): the check's failed executions newest first, a page per read, until each partition has its own. A read per
    HISTORY_PAGE failures instead of one per failure."""
    wanted, cursor = set(partitions), None
    while wanted:
        page = storage.get_asset_check_execution_history(check_key, limit=HISTORY_PAGE, cursor=cursor, status={FAILED})
        for record in page:
            if record.partition in wanted:
                wanted.discard(record.partition)
                yield record
        if len(page) < HISTORY_PAGE:
            return
        cursor = page[-1].id


def _measured(evaluation: AssetCheckEvaluation) -> str:
    """The check's own `measured` line, or its metadata as `name=value` (the integrity checks have no such line)."""
    metadata = {label: value.value for label, value in evaluation.metadata.items()}
    return str(metadata.get("measured") or ", ".join(f"{label}={value}" for label, value in metadata.items()))
