"""The paid create without Dagster: `submission.submit` against the emulator over HTTP and a real ledger.

Each way a create can end is checked against the emulator's own record of creates and charges: a new task is
created once, a refusal releases its reservation, a lost answer is re-sent under its key and paid once, and a
task the ledger holds is never created again, whether the API lost it or it failed.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from rivya_pipeline.emulator import FAIL_MARKER, FaultRule, RivyaEmulator
from rivya_pipeline.ledger import CreditLimits, Ledger
from rivya_pipeline.rivya import GenerationRequest, GenerationTask, RivyaClient, TaskStatus
from rivya_pipeline.submission import (
    OutcomeUnknown,
    Refused,
    Submitted,
    TaskFailed,
    UnknownTask,
    record_news,
    submit,
)
from rivya_pipeline_tests.fixtures_emulator import TEST_ACCOUNT
from rivya_pipeline_tests.helpers import KLING_PRICE, track_due_task

DEADLINE = timedelta(minutes=30)
REQUEST = GenerationRequest.build(prompt="A lighthouse beam sweeping over a calm sea.", params={"duration": 3})
DOOMED = GenerationRequest.build(prompt=f"A lighthouse in a storm {FAIL_MARKER}", params={"duration": 3})
TERMINAL_WAIT_SECONDS = 10.0


def submit_request(client: RivyaClient, ledger: Ledger, request: GenerationRequest = REQUEST) -> Submitted:
    return submit(
        client,
        ledger,
        request,
        [],
        brief_id="lighthouse",
        budget_run_id="run-1",
        client_request_id="run-1",
        limits=CreditLimits(),
        deadline=DEADLINE,
    )


def ended(client: RivyaClient, task_id: str) -> GenerationTask:
    give_up = time.monotonic() + TERMINAL_WAIT_SECONDS
    while not (task := client.get_generation(task_id)).is_terminal:
        assert time.monotonic() < give_up, f"task {task_id} is still {task.status}"
        time.sleep(0.1)
    return task


def paid(emulator: RivyaEmulator) -> list[tuple[str, int]]:
    return [(charge["task_id"], charge["credits"]) for charge in emulator.stats()["charges"]]


def test_a_new_request_is_created_once_and_tracked_until_its_deadline(emulator, client, ledger):
    first = submit_request(client, ledger)
    again = submit_request(client, ledger)

    assert (first.decision.action, again.decision.action) == ("new", "reattach")
    assert again.task.id == first.task.id
    record = ledger.get(REQUEST.idempotency_key())
    assert (record.task_id, record.status, record.reserved_credits) == (first.task.id, TaskStatus.QUEUED, KLING_PRICE)
    assert record.deadline_at - record.submitted_at >= DEADLINE
    assert first.decision.body["client_request_id"] == "run-1"
    assert paid(emulator) == [(first.task.id, KLING_PRICE)]


def test_a_refused_create_raises_refused_and_releases_its_reservation(emulator, client, ledger):
    emulator.set_credits(TEST_ACCOUNT, KLING_PRICE - 1)

    with pytest.raises(Refused, match="^Rivya refused the task: insufficient_credits:") as refused:
        submit_request(client, ledger)

    assert not refused.value.retryable
    assert ledger.get(REQUEST.idempotency_key()) is None
    assert paid(emulator) == []


def test_a_lost_answer_is_outcome_unknown_and_the_resend_pays_once(configure_emulator, client, ledger):
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0)
    emulator.set_faults([FaultRule(endpoint="create_generation", kind="lost_response", lost_as="drop_connection")])
    with pytest.raises(OutcomeUnknown, match="re-sends the same request with the same Idempotency-Key") as lost:
        submit_request(client, ledger)  # one attempt only: its answer is lost
    assert lost.value.retryable
    assert ledger.get(REQUEST.idempotency_key()).status == TaskStatus.SUBMITTING
    (charged,) = paid(emulator)
    ended(client, charged[0])  # the replay will answer with a task that has already ended
    emulator.set_faults([])

    resent = submit_request(client, ledger)

    assert (resent.decision.action, resent.task.id, resent.task.status) == ("resend", charged[0], "succeeded")
    record = ledger.get(REQUEST.idempotency_key())
    assert (record.status, record.final_credits, record.next_poll_at) == (TaskStatus.SUCCEEDED, KLING_PRICE, None)
    assert paid(emulator) == [charged]


def test_a_task_the_api_does_not_know_is_not_created_again(emulator, client, ledger):
    track_due_task(ledger, "task_of_another_account", REQUEST.idempotency_key())

    with pytest.raises(UnknownTask, match="task_of_another_account .* bump `regenerate`") as unknown:
        submit_request(client, ledger)

    assert not unknown.value.retryable
    assert emulator.stats()["creates_performed"] == 0


def test_a_failed_task_is_reported_and_not_bought_again(emulator, client, ledger):
    task_id = submit_request(client, ledger, DOOMED).task.id
    ended(client, task_id)

    with pytest.raises(TaskFailed, match=f"Task {task_id} for brief 'lighthouse' failed .*bump `regenerate`"):
        submit_request(client, ledger, DOOMED)

    assert emulator.stats()["creates_performed"] == 1


def test_a_terminal_status_seen_first_by_a_step_is_recorded_once(emulator, client, ledger):
    task = ended(client, submit_request(client, ledger).task.id)

    assert record_news(ledger, task)
    assert not record_news(ledger, task)
    record = ledger.find_by_task(task.id)
    assert (record.status, record.final_credits, record.next_poll_at) == (TaskStatus.SUCCEEDED, KLING_PRICE, None)
