"""`rivya-pipeline run`: the whole pipeline in one process, for cron machines without a Dagster daemon.

It drives the same definitions and the same polling code as the sensor, on the Dagster instance at
DAGSTER_HOME, so `dagster dev` afterwards shows these runs and their lineage. The ledger decides
what each brief needs: a brief whose current version was already submitted is never submitted
again (pending tasks are polled, stored ones and failed ones are only reported).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetsDefinition,
    DagsterInstance,
    ExecuteInProcessResult,
    Failure,
    JobExecutionResult,
    materialize,
)
from dagster_shared.error import SerializableErrorInfo

from .briefs import Brief
from .definitions import ASSETS, build_resources
from .defs.assets import BATCH_TAG, generation_task, reference_uploads, stored_video, video_brief
from .defs.inputs import TASK_TAG
from .defs.schedules import VERSION_TAG, add_brief_partitions, brief_version
from .defs.store_batch import in_batches, store_videos, store_videos_run_config
from .defs.storing import store_outlook
from .defs.video_qc import QcFailure, qc_failures
from .ledger import Ledger, TaskRecord
from .polling import TaskPoller
from .rivya import PENDING_STATUSES, TaskStatus
from .settings import Settings, utc_now

QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
POLL_IDLE_SECONDS = 0.5


@dataclass
class BriefOutcome:
    brief_id: str
    status: str = "not_submitted"  # a TaskStatus, or "not_submitted", "stored", "store_failed", "store_gave_up"
    task_id: str | None = None
    s3_uri: str | None = None
    reserved_credits: int = 0
    final_credits: int = 0
    refunded_credits: int = 0
    error: str | None = None
    qc_failures: list[QcFailure] = field(default_factory=list)  # of the stored video: it still counts as stored

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
        if self.status == TaskStatus.SUCCEEDED and record.store_attempts:
            self.status = "store_failed" if record.store_due_at else "store_gave_up"
            self.error = f"{record.store_error} {store_outlook(record)}"
        elif record.error_code:
            self.error = f"{record.error_code}: {record.error_message or ''}".strip()


def materialize_brief(
    selection: Sequence[AssetsDefinition] | Sequence[str],
    brief_id: str,
    *,
    instance: DagsterInstance,
    resources: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    raise_on_error: bool = True,
) -> ExecuteInProcessResult:
    """One run of `selection` for one brief's partition, in this process, logging warnings and errors only."""
    return materialize(
        ASSETS,
        selection=selection,
        partition_key=brief_id,
        instance=instance,
        resources=resources,
        tags=tags,
        run_config=QUIET_LOGS,
        raise_on_error=raise_on_error,
    )


def failure_text(result: ExecuteInProcessResult | JobExecutionResult) -> str:
    """The user-facing reason of the first failed step (the Failure's own text, not Dagster's wrapper), or of the
    run itself when it failed before or between steps (a resource that could not start, Dagster's own storage)."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            return _root_cause(event.step_failure_data.error)
    for event in result.all_events:
        run_failure = event.job_failure_data if event.is_run_failure else None
        if run_failure and run_failure.error:
            return _root_cause(run_failure.error)
    return "run failed"


def _root_cause(error: SerializableErrorInfo) -> str:
    """The first line of the innermost error: a Failure's own words, any other error with its class."""
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    if error.cls_name == Failure.__name__:
        message = message.partition(": ")[2]  # the text after the exception's qualified class name
    return message.splitlines()[0]


def progress_counts(outcomes: Sequence[BriefOutcome]) -> dict[str, int]:
    """What a progress line shows: briefs validated, submitted, still generating, stored, failed; credits so far."""
    failed = {TaskStatus.FAILED, TaskStatus.TIMED_OUT, "store_gave_up"}
    return {
        "validated": len(outcomes),
        "submitted": sum(1 for o in outcomes if o.task_id),
        "generating": sum(1 for o in outcomes if o.status in PENDING_STATUSES),
        "stored": sum(1 for o in outcomes if o.succeeded),
        "failed": sum(1 for o in outcomes if o.status in failed or (o.error and not o.task_id)),
        "credits": sum(o.final_credits or o.reserved_credits for o in outcomes),
    }


class HeadlessRun:
    def __init__(
        self,
        *,
        settings: Settings,
        instance: DagsterInstance,
        on_progress: Callable[[Sequence[BriefOutcome]], None] | None = None,
    ) -> None:
        """`on_progress` is called with every brief's outcome so far, after each submit and each pass of polls."""
        self.instance = instance
        self._on_progress = on_progress or (lambda outcomes: None)
        self.resources = build_resources(settings)
        self.ledger: Ledger = self.resources["ledger"].for_instance(instance)
        self.batch = f"cli-{utc_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"

    def run(self, briefs: list[Brief], timeout_seconds: float) -> list[BriefOutcome]:
        add_brief_partitions(self.instance, [b.id for b in briefs])
        outcomes = {b.id: BriefOutcome(b.id) for b in briefs}
        keys = {b.id: b.request.idempotency_key() for b in briefs}
        known = self.ledger.get_many(list(keys.values()))  # one read per 500 briefs: a mostly stored folder is cheap
        for brief in briefs:
            record = known.get(keys[brief.id])
            if record is None or record.status == TaskStatus.SUBMITTING:  # new, or a create whose answer was lost
                submit = [video_brief, reference_uploads, generation_task]
                self._materialize(submit, brief.id, outcomes[brief.id], {VERSION_TAG: brief_version(brief)})
                outcomes[brief.id].update(self.ledger.get(keys[brief.id]))
                self._on_progress(list(outcomes.values()))
            else:
                outcomes[brief.id].update(record)
        self._on_progress(list(outcomes.values()))
        unfinished = PENDING_STATUSES | {TaskStatus.SUCCEEDED, "store_failed"}  # a store given up on is only reported
        waiting = {b: k for b, k in keys.items() if outcomes[b].status in unfinished}
        with self.resources["rivya"].process_config_and_initialize_cm() as rivya:  # resolves the EnvVar key
            self._poll_and_store(rivya.poller(self.ledger), waiting, outcomes, time.monotonic() + timeout_seconds)
        for brief_id in (b for b in waiting if outcomes[b].status in PENDING_STATUSES):
            outcomes[brief_id].status = TaskStatus.TIMED_OUT
            outcomes[brief_id].error = f"still processing after {timeout_seconds:.0f}s; the sensor keeps polling"
        for failure in qc_failures(self.instance, list(outcomes)):
            outcomes[failure.brief_id].qc_failures.append(failure)
        return list(outcomes.values())

    def _materialize(
        self,
        selection: list[AssetsDefinition],
        brief_id: str,
        outcome: BriefOutcome,
        tags: dict[str, str] | None = None,
    ) -> None:
        result = materialize_brief(
            selection,
            brief_id,
            instance=self.instance,
            resources=self.resources,
            tags={BATCH_TAG: self.batch, **(tags or {})},
            raise_on_error=False,
        )
        if not result.success:
            outcome.error = failure_text(result)

    def _poll_and_store(
        self, poller: TaskPoller, waiting: dict[str, str], outcomes: dict[str, BriefOutcome], deadline: float
    ) -> None:
        """Polls until every waiting task ends and stores the videos of the successes in store_videos batches (as
        the sensor does). A failed store is tried again when the store queue says it is due (its backoff passed),
        until it is stored, its store window runs out, or `deadline`; what is left stays in `waiting`.

        A video an earlier `run` could not store is tried at once: whoever starts a run asks for it now."""
        unstored: dict[str, str] = {}
        retry_now = True
        while (waiting or unstored) and time.monotonic() < deadline:
            if any(outcomes[b].status in PENDING_STATUSES for b in waiting):
                poller.poll_due(time_budget_seconds=max(1.0, deadline - time.monotonic()))
            for brief_id, key in list(waiting.items()):
                record = self.ledger.get(key)
                if record is not None and record.status not in PENDING_STATUSES:
                    del waiting[brief_id]
                    unstored[brief_id] = key
            records = [r for r in (self.ledger.get(k) for k in unstored.values()) if r is not None]
            now = utc_now()
            self._store(
                [r for r in records if r.store_due_at and (retry_now or r.store_due_at <= now) and not r.stored_uri]
            )
            retry_now = False
            for brief_id, key in list(unstored.items()):
                record = self.ledger.get(key)
                outcomes[brief_id].update(record)
                if record is None or record.stored_uri or record.store_due_at is None:  # stored, given up, or failed
                    del unstored[brief_id]
            self._on_progress(list(outcomes.values()))
            if waiting or unstored:
                time.sleep(POLL_IDLE_SECONDS)
        waiting.update({b: k for b, k in unstored.items() if b not in waiting})

    def _store(self, records: list[TaskRecord]) -> None:
        """Videos never tried in store_videos batches; a video a store did not store is tried alone, which gives
        its own error on its partition."""
        first_tries = [r for r in records if not r.store_attempts]
        for batch in in_batches(first_tries):
            store_videos.execute_in_process(
                run_config={**QUIET_LOGS, **store_videos_run_config([r.accepted_task_id for r in batch])},
                instance=self.instance,
                resources=self.resources,
                tags={BATCH_TAG: self.batch},
                raise_on_error=False,
            )
        for record in records:
            if record.store_attempts:
                materialize_brief(
                    [stored_video],
                    record.brief_id,
                    instance=self.instance,
                    resources=self.resources,
                    tags={BATCH_TAG: self.batch, TASK_TAG: record.accepted_task_id},
                    raise_on_error=False,
                )
