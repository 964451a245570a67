"""Uploaded files and generation tasks, and how a task's status follows from the emulator clock."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .config import VideoFault
from .errors import iso_timestamp


class EmulatorClock:
    """Emulated seconds since reset, running `time_scale` times faster than real time. Timestamps shown to
    clients are the real wall-clock moments at which emulated events happen."""

    def __init__(self, time_scale: float) -> None:
        self.time_scale = time_scale
        self._start_monotonic = time.monotonic()
        self._start_wall = datetime.now(UTC)

    def now(self) -> float:
        return (time.monotonic() - self._start_monotonic) * self.time_scale

    def wall(self, emulated_seconds: float) -> str:
        return iso_timestamp(self._start_wall + timedelta(seconds=emulated_seconds / self.time_scale))


@dataclass
class StoredFile:
    id: str
    account: str
    kind: str
    name: str
    mime_type: str
    content: bytes
    url: str
    created_at: str
    duration_seconds: float | None = None
    duration_token: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "kind": self.kind,
            "url": self.url,
            "name": self.name,
            "mime_type": self.mime_type,
            "size_bytes": len(self.content),
            "duration_seconds": self.duration_seconds,
            "duration_token": self.duration_token,
            "created_at": self.created_at,
        }


@dataclass
class Task:
    """A generation; its outcome is fixed at creation, its status is read off the clock."""

    id: str
    account: str
    model_id: str
    params: dict[str, Any]
    price: int
    will_fail: bool
    result_url: str
    created: float
    started: float
    finished: float
    video_fault: VideoFault | None = None

    def status(self, now: float) -> str:
        if now < self.started:
            return "queued"
        if now < self.finished:
            return "processing"
        return "failed" if self.will_fail else "succeeded"

    def public(self, now: float, clock: EmulatorClock) -> dict[str, Any]:
        status = self.status(now)
        changed = {"queued": self.created, "processing": self.started}.get(status, self.finished)
        succeeded = status == "succeeded"
        return {
            "id": self.id,
            "status": status,
            "model": self.model_id,
            "reserved_credits": self.price,
            "final_credits": self.price if succeeded else 0,
            "created_at": clock.wall(self.created),
            "updated_at": clock.wall(changed),
            "result": {"primary_url": self.result_url, "urls": [self.result_url]} if succeeded else None,
            "error": (
                {"code": "generation_failed", "message": "The model could not generate this video."}
                if status == "failed"
                else None
            ),
        }
