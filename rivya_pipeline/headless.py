"""`rivya-pipeline run`: the whole pipeline in one process, for cron machines without a Dagster daemon.

It drives the same definitions and the same polling code as the sensor, on the Dagster instance at
DAGSTER_HOME, so `dagster dev` afterwards shows these runs and their lineage. The ledger decides
what each brief needs: a brief whose current version was already submitted is never submitted
again (pending tasks are polled, stored ones and failed ones are only reported).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from dagster import DagsterInstance, materialize

from .briefs import Brief
from .definitions import ASSETS, build_resources
from .defs.assets import (
    BATCH_TAG,
    briefs_partitions,
    generation_task,
    reference_uploads,
    stored_video,
    video_brief,
)
from .defs.inputs import TASK_TAG
from .defs.schedules import PARTITION_BATCH
from .ledger import Ledger, TaskRecord
from .settings import Settings

QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
POLL_IDLE_SECONDS = 0.5
PENDING = ("queued", "processing")


@dataclass
class BriefOutcome:
    brief_id: str
    status: str = "not_submitted"
    task_id: str | None = None
    s3_uri: str | None = None
    reserved_credits: int = 0
    final_credits: int = 0
    refunded_credits: int = 0
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "stored"

    def update(self, record: TaskRecord | None) -> None:
        if record is None:
            return
        self.task_id = record.task_id
        self.status = "stored" if record.stored_uri else record.status
        self.s3_uri = record.stored_uri
        self.reserved_credits = record.reserved_credits
        self.final_credits = record.final_credits
        self.refunded_credits = record.refunded_credits
        if record.error_code:
            self.error = f"{record.error_code}: {record.error_message or ''}".strip()


def failure_text(result) -> str:
    """The user-facing reason of the first failed step (the Failure's own text, not Dagster's wrapper), or of the
    run itself when it failed before or between steps (a resource that could not start, Dagster's own storage)."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            return _root_cause(event.step_failure_data.error).removeprefix("dagster._core.definitions.events.Failure: ")
    for event in result.all_events:
        if event.is_run_failure and event.event_specific_data and event.event_specific_data.error:
            return _root_cause(event.event_specific_data.error)
    return "run failed"


def _root_cause(error) -> str:
    while error.cause is not None:
        error = error.cause
    return error.message.strip().splitlines()[0]


class HeadlessRun:
    def __init__(self, *, settings: Settings, instance: DagsterInstance) -> None:
        self.instance = instance
        self.resources = build_resources(settings)
        self.ledger: Ledger = self.resources["credit_limits"].ledger(instance)
        self.batch = f"cli-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"

    def run(self, briefs: list[Brief], timeout_seconds: float) -> list[BriefOutcome]:
        self._register(briefs)
        outcomes = {b.id: BriefOutcome(b.id) for b in briefs}
        keys = {b.id: b.request.idempotency_key() for b in briefs}
        for brief in briefs:
            record = self.ledger.get(keys[brief.id])
            if record is None or record.status == "submitting":  # new, or a create whose answer was lost
                self._materialize([video_brief, reference_uploads, generation_task], brief.id, outcomes[brief.id])
            outcomes[brief.id].update(self.ledger.get(keys[brief.id]))
        waiting = {b: k for b, k in keys.items() if outcomes[b].status in PENDING + ("succeeded",)}
        with self.resources["rivya"].process_config_and_initialize_cm() as rivya:  # resolves the EnvVar key
            self._poll_and_store(rivya.poller(self.ledger), waiting, outcomes, time.monotonic() + timeout_seconds)
        for brief_id in waiting:
            outcomes[brief_id].status = "timed_out"
            outcomes[brief_id].error = f"still processing after {timeout_seconds:.0f}s; the sensor keeps polling"
        return list(outcomes.values())

    def _register(self, briefs: list[Brief]) -> None:
        existing = set(self.instance.get_dynamic_partitions(briefs_partitions.name))
        new_keys = [b.id for b in briefs if b.id not in existing]
        for start in range(0, len(new_keys), PARTITION_BATCH):
            self.instance.add_dynamic_partitions(briefs_partitions.name, new_keys[start : start + PARTITION_BATCH])

    def _materialize(self, selection: list, brief_id: str, outcome: BriefOutcome, tags: dict | None = None) -> None:
        result = materialize(
            ASSETS,
            selection=selection,
            partition_key=brief_id,
            instance=self.instance,
            resources=self.resources,
            tags={BATCH_TAG: self.batch, **(tags or {})},
            run_config=QUIET_LOGS,
            raise_on_error=False,
        )
        if not result.success:
            outcome.error = failure_text(result)

    def _poll_and_store(self, poller, waiting: dict[str, str], outcomes: dict, deadline: float) -> None:
        """Polls until every waiting task ends, storing each success at once; leaves the rest in `waiting`."""
        while waiting and time.monotonic() < deadline:
            poller.poll_due(time_budget_seconds=max(1.0, deadline - time.monotonic()))
            for brief_id, key in list(waiting.items()):
                record = self.ledger.get(key)
                if record.status in PENDING:
                    continue
                del waiting[brief_id]
                if record.status == "succeeded" and not record.stored_uri:
                    self._materialize([stored_video], brief_id, outcomes[brief_id], {TASK_TAG: record.task_id})
                outcomes[brief_id].update(self.ledger.get(key))
                if outcomes[brief_id].status == "succeeded":  # the store step failed: say so
                    outcomes[brief_id].status = "store_failed"
            if waiting:
                time.sleep(POLL_IDLE_SECONDS)
