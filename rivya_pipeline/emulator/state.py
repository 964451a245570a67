"""All mutable emulator state behind one lock: keys, wallets, files, tasks, idempotency keys and stats.
The uvicorn thread and the test thread both call in, so every method takes the lock and each paid
create (idempotency check, validation, charge) is one atomic step."""

from __future__ import annotations

import heapq
import json
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .catalog import CATALOG
from .config import FAIL_MARKER, VIDEO_FAULTS, EmulatorConfig, VideoFault, video_fault_marker
from .errors import ApiError, new_id
from .faults import FaultInjector
from .records import EmulatorClock, StoredFile, Task
from .validation import GenerationRequest, validate_generation
from .video import DEFAULT_MODE, ResultShape

MAX_IDEMPOTENCY_KEY_LENGTH = 255


@dataclass
class _IdempotencyRecord:
    fingerprint: str
    task_id: str
    stored_at: float


@dataclass
class _Stats:
    requests: Counter[str] = field(default_factory=Counter)
    polls: Counter[str] = field(default_factory=Counter)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    creates_performed: int = 0
    creates_without_idempotency_key: int = 0
    idempotent_replays: int = 0
    uploads_performed: int = 0
    media_requests: int = 0
    media_bytes_served: int = 0
    media_authorization_headers_seen: int = 0
    media_authorized_paths: list[str] = field(default_factory=list)


class EmulatorState:
    def __init__(self, config: EmulatorConfig, media_base_url: str) -> None:
        self.media_base_url = media_base_url
        self._lock = threading.RLock()
        self.reset(config)

    def reset(self, config: EmulatorConfig) -> None:
        with self._lock:
            self.config = config
            self.clock = EmulatorClock(config.time_scale)
            self.faults = FaultInjector(config.faults, config.seed, now=self.clock.now)
            self._outcome_rng = random.Random(config.seed)
            self._keys = {api_key.key: api_key for api_key in config.api_keys}
            accounts = {api_key.account for api_key in config.api_keys} | set(config.credits_by_account)
            self._wallets = {account: config.starting_credits(account) for account in sorted(accounts)}
            self._files: dict[str, StoredFile] = {}
            self._files_by_url: dict[str, StoredFile] = {}
            self._tasks: dict[str, Task] = {}
            self._unsettled: list[tuple[float, str]] = []  # heap of (finished, task id)
            self._idempotency: dict[tuple[str, str], _IdempotencyRecord] = {}
            self._stats = _Stats()

    def authenticate(self, authorization: str | None, scope: str) -> str:
        """The account behind a `Bearer` key holding `scope`, or the contract's 401/403 error."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if not scheme or (scheme.lower() == "bearer" and not token.strip()):
            raise ApiError("api_key_missing", "Send Authorization: Bearer rvya_sk_<secret>.")
        api_key = self._keys.get(token.strip()) if scheme.lower() == "bearer" else None
        if api_key is None:
            raise ApiError("api_key_invalid", "The API key is not valid.")
        if api_key.status != "active":
            raise ApiError(f"api_key_{api_key.status}", f"The API key has been {api_key.status}.")
        if scope not in api_key.scopes:
            raise ApiError("api_scope_denied", f"The API key lacks the scope {scope}.")
        return api_key.account

    def count_request(self, endpoint: str) -> None:
        with self._lock:
            self._stats.requests[endpoint] += 1

    def record_media_request(self, path: str, has_authorization: bool) -> None:
        with self._lock:
            self._stats.media_requests += 1
            if has_authorization:
                self._stats.media_authorization_headers_seen += 1
                self._stats.media_authorized_paths.append(path)

    def record_media_bytes(self, count: int) -> None:
        with self._lock:
            self._stats.media_bytes_served += count

    def add_file(
        self, account: str, kind: str, name: str, mime_type: str, content: bytes, duration_seconds: float | None
    ) -> dict[str, Any]:
        with self._lock:
            file_id = new_id("file")
            stored = StoredFile(
                id=file_id,
                account=account,
                kind=kind,
                name=name,
                mime_type=mime_type,
                content=content,
                url=f"{self.media_base_url}/files/{file_id}",
                created_at=self.clock.wall(self.clock.now()),
                duration_seconds=duration_seconds,
                duration_token=new_id("dtok") if duration_seconds is not None else None,
            )
            self._files[file_id] = stored
            self._files_by_url[stored.url] = stored
            self._stats.uploads_performed += 1
            return stored.public()

    def get_file(self, account: str, file_id: str) -> dict[str, Any]:
        with self._lock:
            stored = self._files.get(file_id)
            if stored is None or stored.account != account:
                raise ApiError("not_found", "No such file.")
            return stored.public()

    def file_content(self, file_id: str) -> StoredFile | None:
        """For the media host, which serves uploads publicly like a CDN."""
        with self._lock:
            return self._files.get(file_id)

    def create_generation(self, account: str, idempotency_key: str | None, body: Any) -> tuple[dict[str, Any], bool]:
        """(task, replayed). A known key with the same canonical body replays the original task; a 4xx
        leaves no trace of the key; otherwise the price is reserved and the task queued."""
        with self._lock:
            now = self._settle()
            fingerprint = json.dumps(body, sort_keys=True, separators=(",", ":"))
            replayed = self._replay(account, idempotency_key, fingerprint, now)
            if replayed is not None:
                return replayed.public(now, self.clock), True
            request = validate_generation(body, lambda url: self._owned_file(account, url))
            task = self._charge_and_queue(account, request, now)
            if idempotency_key is not None:
                self._idempotency[(account, idempotency_key)] = _IdempotencyRecord(fingerprint, task.id, now)
            return task.public(now, self.clock), False

    def _replay(self, account: str, idempotency_key: str | None, fingerprint: str, now: float) -> Task | None:
        if idempotency_key is None:
            self._stats.creates_without_idempotency_key += 1
            return None
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
            raise ApiError("validation_failed", f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} characters.")
        record = self._idempotency.get((account, idempotency_key))
        if record is None or now - record.stored_at > self.config.idempotency_ttl_seconds:
            return None
        if record.fingerprint != fingerprint:
            raise ApiError("idempotency_conflict", "This Idempotency-Key was used with a different body.")
        self._stats.idempotent_replays += 1
        return self._tasks[record.task_id]

    def _charge_and_queue(self, account: str, request: GenerationRequest, now: float) -> Task:
        price, wallet = request.model.price(), self._wallet(account)
        if wallet < price:
            raise ApiError("insufficient_credits", f"This generation costs {price} credits; {wallet} left.")
        self._wallets[account] = wallet - price
        task_id = new_id("task")
        started = now + self.config.queued_seconds
        will_fail = FAIL_MARKER in request.prompt or self._outcome_rng.random() < self.config.failure_rate
        task = Task(
            id=task_id,
            account=account,
            model_id=request.model.id,
            params=request.params,
            price=price,
            will_fail=will_fail,
            result_url=f"{self.config.result_url_base or self.media_base_url}/media/{task_id}.mp4",
            created=now,
            started=started,
            finished=started + self.config.processing_seconds,
            video_fault=None if will_fail else self._video_fault(request.prompt),
        )
        self._tasks[task_id] = task
        heapq.heappush(self._unsettled, (task.finished, task_id))
        self._stats.charges[task_id] = {"task_id": task_id, "account": account, "credits": price, "refunded": False}
        self._stats.creates_performed += 1
        return task

    def _video_fault(self, prompt: str) -> VideoFault | None:
        """A marker in the prompt (one brief, deterministically), else a `bad_video` rule firing for this create."""
        marked: VideoFault | None = next((fault for fault in VIDEO_FAULTS if video_fault_marker(fault) in prompt), None)
        if marked is not None:
            return marked
        rule = self.faults.take("create_generation", kind="bad_video")
        return rule.video if rule is not None else None

    def get_generation(self, account: str, task_id: str) -> dict[str, Any]:
        with self._lock:
            now = self._settle()
            task = self._tasks.get(task_id)
            if task is None or task.account != account:
                raise ApiError("not_found", "No such generation.")
            self._stats.polls[task_id] += 1
            return task.public(now, self.clock)

    def credits(self, account: str) -> int:
        with self._lock:
            self._settle()
            return self._wallet(account)

    def set_credits(self, account: str, credits: int) -> None:
        with self._lock:
            self._wallets[account] = credits

    def result_video(self, task_id: str) -> ResultShape | None:
        """The shape of a succeeded task's video, for the media host."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.status(self.clock.now()) != "succeeded":
                return None
            model, params = CATALOG[task.model_id], task.params
            return ResultShape(
                duration_seconds=int(params[model.duration_param]),
                aspect_ratio=params[model.aspect_param],
                mode=params[model.mode_param] if model.mode_param else DEFAULT_MODE,
                sound=model.sound_param is not None and params[model.sound_param] == "true",
                fault=task.video_fault,
            )

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = self._settle()
            stats = self._stats
            return {
                "requests": dict(stats.requests),
                "creates_performed": stats.creates_performed,
                "creates_without_idempotency_key": stats.creates_without_idempotency_key,
                "idempotent_replays": stats.idempotent_replays,
                "charges": [dict(charge) for charge in stats.charges.values()],
                "wallets": dict(self._wallets),
                "uploads_performed": stats.uploads_performed,
                "media_requests": stats.media_requests,
                "media_bytes_served": stats.media_bytes_served,
                "media_authorization_headers_seen": stats.media_authorization_headers_seen,
                "media_authorized_paths": list(stats.media_authorized_paths),
                "polls": dict(stats.polls),
                "tasks_by_status": dict(Counter(task.status(now) for task in self._tasks.values())),
                "faults_injected": self.faults.injected_counts(),
                "fault_windows": [self._wall_window(window) for window in self.faults.windows()],
                "clock_seconds": now,
            }

    def _wall_window(self, window: dict[str, Any]) -> dict[str, Any]:
        """A `for_seconds` window (emulated seconds since reset) with the wall-clock moments it opens and closes."""
        opened, closes = window["opened_at"], window["closes_at"]
        return window | {
            "opened_wall": None if opened is None else self.clock.wall(opened),
            "closes_wall": None if closes is None else self.clock.wall(closes),
        }

    def _wallet(self, account: str) -> int:
        return self._wallets.setdefault(account, self.config.starting_credits(account))

    def _owned_file(self, account: str, url: str) -> StoredFile | None:
        stored = self._files_by_url.get(url)
        return stored if stored is not None and stored.account == account else None

    def _settle(self) -> float:
        """Refund every task that has failed by now (lazily, in finishing order); returns now."""
        now = self.clock.now()
        while self._unsettled and self._unsettled[0][0] <= now:
            _, task_id = heapq.heappop(self._unsettled)
            task = self._tasks[task_id]
            if task.will_fail:
                self._wallets[task.account] += task.price
                self._stats.charges[task_id]["refunded"] = True
        return now
