"""The paid create, paid for at most once: submit a new task, re-attach to a known one, or re-send a create whose
answer was lost, and record what Rivya answered. Shared by the generation_task and stored_video assets; no Dagster
import (the assets turn these exceptions into Dagster failures).

Besides the ledger's own BudgetExceeded and StaleSubmission (nothing was sent), `submit` raises a
SubmissionError whose text says what happened and what to do, and whose `retryable` says whether a re-run can
change the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from .ledger import CreditLimits, Ledger, SubmitDecision, TaskTracker
from .polling import FIRST_POLL_SECONDS
from .rivya import FileObject, GenerationRequest, GenerationTask, NotFound, RivyaClient, RivyaError, TaskStatus
from .settings import utc_now


class SubmissionError(Exception):
    """The create gave no task to wait for."""

    retryable = False


class Refused(SubmissionError):
    """Rivya refused the create for good (validation, credits, key): its reservation is released."""


class OutcomeUnknown(SubmissionError):
    """The create may or may not have been performed (and charged); re-sending it under its key is safe."""

    retryable = True


class UnknownTask(SubmissionError):
    """The ledger holds a task for this request that the API does not know (another account or base URL)."""


class TaskFailed(SubmissionError):
    """The task of this request already failed; only a bumped `regenerate` pays for a new one."""


@dataclass(frozen=True)
class Submitted:
    """A task Rivya accepted for the request, and how it was reached (the ledger's decision)."""

    decision: SubmitDecision
    task: GenerationTask


def submit(
    client: RivyaClient,
    ledger: Ledger,
    request: GenerationRequest,
    uploads: list[FileObject],
    *,
    brief_id: str,
    budget_run_id: str,
    client_request_id: str,
    limits: CreditLimits,
    deadline: timedelta,
) -> Submitted:
    """Submit `request` under its idempotency key, within `limits` (the per-run cap counts `budget_run_id`).

    The ledger decides first: a new request is checked and reserved, a known task is re-attached to, a create
    whose answer was lost is re-sent with its first body. A task accepted now must end within `deadline`.
    """
    decision = ledger.begin_submit(
        idempotency_key=request.idempotency_key(),
        brief_id=brief_id,
        run_id=budget_run_id,
        model=request.model,
        price_credits=request.price_credits,
        body=request.api_body(uploads, client_request_id=client_request_id),
        limits=limits,
        wallet_credits=client.get_credits,
    )
    if decision.task_id is not None:  # "reattach"
        task = _reattach(client, decision.task_id)
    else:
        task = _create(client, ledger, decision, deadline)
    if task.status == TaskStatus.FAILED:
        raise TaskFailed(
            f"Task {task.id} for brief {brief_id!r} failed ({task.error.code if task.error else '?'}; "
            f"{task.refunded_credits} credits refunded). It is not resubmitted silently: bump `regenerate` in the "
            "brief to pay for a new one."
        )
    return Submitted(decision, task)


def _reattach(client: RivyaClient, task_id: str) -> GenerationTask:
    """A known task is only looked up, never created again."""
    try:
        return client.get_generation(task_id)
    except NotFound:
        raise UnknownTask(
            f"The ledger holds task {task_id} for this request but the API does not know it "
            "(another account or base URL?). Not resubmitting: bump `regenerate` to pay for a new task."
        ) from None


def _create(client: RivyaClient, ledger: Ledger, decision: SubmitDecision, deadline: timedelta) -> GenerationTask:
    """Create the task (or re-send the stored request) and record it."""
    try:
        task = client.create_generation(decision.body, idempotency_key=decision.idempotency_key)
    except RivyaError as exc:
        if not exc.retryable:
            ledger.release(decision.idempotency_key)
            raise Refused(f"Rivya refused the task: {exc}") from exc
        raise OutcomeUnknown(
            f"Outcome of the create is unknown ({exc}); a re-run re-sends the same request with the same "
            "Idempotency-Key, so it cannot pay twice."
        ) from exc
    now = utc_now()
    ledger.record_task(
        decision.idempotency_key,
        task_id=task.id,
        status=task.status,
        reserved_credits=task.reserved_credits,
        final_credits=task.final_credits,
        deadline_at=now + deadline,
        next_poll_at=now + timedelta(seconds=FIRST_POLL_SECONDS),
    )
    if task.is_terminal:
        # A create replayed after a lost answer can return a task that has already ended, and nothing polls a
        # terminal task: record its outcome here, or a failure would be reported without its code and refund.
        record_terminal(ledger, task)
    return task


def record_terminal(ledger: TaskTracker, task: GenerationTask) -> None:
    """A terminal status seen outside the sensor's polls: the ledger stops polling the task and has its credits."""
    ledger.update_status(
        task.id,
        status=task.status,
        final_credits=task.final_credits,
        refunded_credits=task.refunded_credits,
        error_code=task.error.code if task.error else None,
        error_message=task.error.message if task.error else None,
        polled_at=utc_now(),
    )


def record_news(ledger: TaskTracker, task: GenerationTask) -> bool:
    """Record a terminal status this process saw before the sensor did; True when the ledger did not know it."""
    record = ledger.find_by_task(task.id)
    if record is None or record.status == task.status:
        return False
    record_terminal(ledger, task)
    return True
