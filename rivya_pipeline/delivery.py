"""From a succeeded task to a verified video in S3, with its poster and contact sheet (no Dagster import).

The result is streamed from the media host straight into a multipart upload while a copy goes to a
temporary file on disk for probing, so memory never depends on the video's size. One decode of that copy
yields the probe, the QC measurements and the pictures, which are stored next to the video. The stored
video's SHA-256 is read back from S3 and compared with the hash taken on the way in.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .probe import ProbeError, VideoInspection, VideoProbe, inspect_video
from .qc.thresholds import QcThresholds
from .rivya import GenerationTask
from .rivya.media import MediaFetcher
from .storage import StoredObject, VideoStore

if TYPE_CHECKING:
    from .qc.pictures import Picture

log = logging.getLogger(__name__)
PROGRESS_EVERY_SECONDS = 5.0


@dataclass(frozen=True)
class Delivery:
    """`inspection` (probe, QC measurements, pictures) is None when the video did not decode (`probe_error` says
    why); `poster` and `sheet` are None when it decoded no frame."""

    video: StoredObject
    sidecar: StoredObject
    stored_sha256: str
    inspection: VideoInspection | None
    probe_error: str | None
    poster: StoredObject | None
    sheet: StoredObject | None
    seconds: float

    @property
    def probe(self) -> VideoProbe | None:
        return self.inspection.probe if self.inspection else None

    @property
    def mb_per_second(self) -> float:
        return self.video.size_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


class _TeeReader:
    """Hands boto3 the media stream while a thread of its own writes the same bytes to a local copy for probing.

    Written between two network reads, the copy slowed the whole transfer down (README, Benchmarks: transfer);
    in its own thread the write overlaps them. One part at most waits for the disk, so memory grows
    by one part at most. A failed write is raised by the next read (which aborts the upload) or on exit.
    """

    def __init__(self, source: Any, copy: IO[bytes]) -> None:
        self._source = source
        self._copy = copy
        self._waiting: queue.Queue[bytes | None] = queue.Queue(maxsize=1)
        self._failure: BaseException | None = None
        self._writer = threading.Thread(target=self._write_copies, name="rivya-probe-copy", daemon=True)

    def __enter__(self) -> _TeeReader:
        self._writer.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._waiting.put(None)
        self._writer.join()
        if exc_type is None:
            self._raise_failure()

    def read(self, size: int = -1) -> bytes:
        self._raise_failure()
        data = self._source.read(size)
        if data:
            self._waiting.put(data)
        return data

    def _write_copies(self) -> None:
        while (data := self._waiting.get()) is not None:
            if self._failure is None:  # after a failure, keep taking parts so that read() never blocks
                try:
                    self._copy.write(data)
                except BaseException as exc:  # handed to the reading thread
                    self._failure = exc

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


class _ProgressLog:
    def __init__(self, total: int | None) -> None:
        self._total = total
        self._started = self._last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY_SECONDS:
            return
        self._last = now
        rate = done / 1e6 / max(now - self._started, 1e-9)
        share = f"{100 * done / self._total:.0f}%" if self._total else f"{done / 1e6:.0f} MB"
        log.info("transfer %s at %.1f MB/s", share, rate)


def deliver_video(
    *,
    task: GenerationTask,
    brief_id: str,
    fetcher: MediaFetcher,
    store: VideoStore,
    lineage: dict[str, Any],
    qc_thresholds: QcThresholds | None = None,
) -> Delivery:
    url = task.result.video_url if task.result else None
    if not url:
        raise ValueError(f"task {task.id} succeeded without a result URL")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rivya-probe-") as tmp:
        copy_path = Path(tmp) / "video.mp4"
        with fetcher.open(url) as stream, copy_path.open("wb") as copy, _TeeReader(stream, copy) as tee:
            video = store.store_video(brief_id, task.id, tee, progress=_ProgressLog(stream.content_length))
        # Read back before the pass over the copy: the decoder's memory and the read-back's never add up.
        stored_sha256 = store.object_sha256(video.key)
        try:
            inspection, probe_error = inspect_video(copy_path, qc_thresholds), None
        except ProbeError as exc:
            inspection, probe_error = None, str(exc)
    pictures = inspection.pictures if inspection else None
    poster = store.store_picture(brief_id, task.id, "poster", pictures.poster.jpeg) if pictures else None
    sheet = store.store_picture(brief_id, task.id, "sheet", pictures.sheet.jpeg) if pictures else None
    sidecar = store.write_sidecar(
        brief_id,
        task.id,
        {
            **lineage,
            "task_id": task.id,
            "video_uri": video.uri,
            "size_bytes": video.size_bytes,
            "sha256": video.sha256,
            "final_credits": task.final_credits,
            "task_created_at": task.created_at,
            "task_updated_at": task.updated_at,
            "probe": asdict(inspection.probe) if inspection else None,
            "qc": asdict(inspection.qc) if inspection else None,
            "poster": _picture_entry(poster, pictures.poster) if pictures and poster else None,
            "sheet": _picture_entry(sheet, pictures.sheet) if pictures and sheet else None,
        },
    )
    return Delivery(video, sidecar, stored_sha256, inspection, probe_error, poster, sheet, time.monotonic() - started)


def _picture_entry(stored: StoredObject, picture: Picture) -> dict[str, Any]:
    """How the sidecar names a stored picture, and which moments of the clip it shows."""
    return {
        "uri": stored.uri,
        "sha256": stored.sha256,
        "width": picture.width,
        "height": picture.height,
        "at_seconds": list(picture.at_seconds),
    }
