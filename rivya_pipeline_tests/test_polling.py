"""The poller against the emulator over HTTP and a real ledger: what a pass records, what it never asks
again, how it stops at its time budget, that one rate window holds across the pollers of one process, and
that its threads' own connections keep the client's retry policy and are all closed when it returns."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import psutil
import pytest

from rivya_pipeline.emulator import FAIL_MARKER, FaultRule, RivyaEmulator
from rivya_pipeline.ledger import Ledger, StatusUpdate
from rivya_pipeline.polling import FAILURES_THAT_STOP_A_PASS, TaskPoller
from rivya_pipeline.rivya import RetryPolicy, RivyaClient
from rivya_pipeline_tests.fixtures_emulator import TEST_API_KEY
from rivya_pipeline_tests.helpers import TASK_BODY, track_due_task, wait_until_outages_end

FAST = {"requests_per_second": 1000, "concurrency": 8}


@pytest.fixture
def submit(client: RivyaClient, ledger: Ledger) -> Callable[..., list[str]]:
    """`submit(count, prompt=...)`: creates tasks on the emulator and tracks them as due; returns their ids."""

    def submit(count: int, prompt: str = TASK_BODY["prompt"]) -> list[str]:
        ids = []
        for _ in range(count):
            key = f"key-{uuid.uuid4().hex}"
            task = client.create_generation(TASK_BODY | {"prompt": prompt}, idempotency_key=key)
            track_due_task(ledger, task.id, key)
            ids.append(task.id)
        return ids

    return submit


def polls(emulator: RivyaEmulator) -> int:
    return emulator.stats()["requests"].get("get_generation", 0)


def connections_to(emulator: RivyaEmulator) -> int:
    """Open TCP connections of this process to the emulator's API (the client ends only)."""
    port = httpx.URL(emulator.base_url).port
    return sum(1 for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port)


def test_a_pass_records_every_change_and_never_asks_again_about_terminal_tasks(
    configure_emulator, client, ledger, submit
):
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0)
    ok = submit(3)
    (doomed,) = submit(1, prompt=f"A kite {FAIL_MARKER}")
    poller = TaskPoller(client, ledger, **FAST)

    report = poller.poll_due()
    again = poller.poll_due()

    assert report.polled == 4 and not report.errors and not report.stopped_early
    assert sorted(t.id for _, t in report.succeeded) == sorted(ok)
    assert [t.id for _, t in report.failed] == [doomed]
    assert {ledger.find_by_task(i).status for i in ok} == {"succeeded"}
    assert ledger.find_by_task(doomed).error_code == "generation_failed"
    assert all(ledger.find_by_task(i).next_poll_at is None for i in [*ok, doomed])
    assert again.polled == 0 and polls(emulator) == 4  # terminal tasks cost no further status calls


def test_a_task_the_api_does_not_know_is_reported_lost_and_dropped(emulator, client, ledger):
    track_due_task(ledger, "task_unknown_to_the_api", "key-lost")

    report = TaskPoller(client, ledger, **FAST).poll_due()

    assert [r.task_id for r in report.lost] == ["task_unknown_to_the_api"]
    record = ledger.find_by_task("task_unknown_to_the_api")
    assert (record.status, record.error_code, record.next_poll_at) == ("failed", "not_found", None)


def test_a_failed_poll_leaves_the_task_pending_and_asks_again_later(configure_emulator, client, ledger, submit):
    emulator = configure_emulator(queued_seconds=60)
    (task_id,) = submit(1)
    emulator.set_faults([FaultRule(endpoint="get_generation", kind="server_error", times=1)])

    report = TaskPoller(client, ledger, **FAST).poll_due()

    assert [r.task_id for r, _ in report.errors] == [task_id] and report.polled == 0
    record = ledger.find_by_task(task_id)
    assert record.status == "queued" and record.poll_count == 1
    assert record.next_poll_at - record.last_polled_at == timedelta(seconds=10)


def test_a_pass_stops_at_its_time_budget_and_the_rest_stay_due_for_the_next(configure_emulator, client, ledger, submit):
    configure_emulator(queued_seconds=60)
    submit(12)
    poller = TaskPoller(client, ledger, requests_per_second=4, concurrency=4)

    first = poller.poll_due(time_budget_seconds=1.0)
    due_after = ledger.due_for_poll(datetime.now(UTC), limit=100)

    assert first.stopped_early and 0 < first.polled < 12
    assert len(due_after) == 12 - first.polled
    assert all(r.last_polled_at is None for r in due_after)  # untouched: exactly the ones not reached


def test_pollers_of_one_api_share_one_rate_window(configure_emulator, client, ledger, submit):
    """The sensor builds a new poller on every tick: back-to-back ticks must not get a fresh window each."""
    configure_emulator(queued_seconds=60)
    submit(10)
    rate = 5

    first = TaskPoller(client, ledger, requests_per_second=rate, concurrency=5).poll_due(max_tasks=5)
    started = time.monotonic()
    second = TaskPoller(client, ledger, requests_per_second=rate, concurrency=5).poll_due(max_tasks=5)
    waited = time.monotonic() - started

    assert first.polled == second.polled == 5
    assert waited >= 0.8  # the window is full of the first poller's 5 requests for about a second


def test_a_batch_naming_an_unknown_task_records_nothing(emulator, ledger, submit):
    (known,) = submit(1)
    now = datetime.now(UTC)

    with pytest.raises(LookupError, match="task_nowhere"):
        ledger.update_statuses(
            [StatusUpdate(known, "processing", 0, 0, now), StatusUpdate("task_nowhere", "processing", 0, 0, now)]
        )

    assert ledger.find_by_task(known).poll_count == 0


def test_each_poll_thread_retries_by_the_client_policy(configure_emulator, ledger, submit):
    emulator = configure_emulator(queued_seconds=60)
    (task_id,) = submit(1)
    emulator.set_faults([FaultRule(endpoint="get_generation", kind="server_error", times=1)])
    retrying = RetryPolicy(max_attempts=2, backoff_base_seconds=0.01, backoff_max_seconds=0.02)

    with RivyaClient(TEST_API_KEY, emulator.base_url, retry=retrying) as client:
        report = TaskPoller(client, ledger, **FAST).poll_due()

    assert report.polled == 1 and not report.errors
    assert polls(emulator) == 2  # the 503, then the answer on the same thread's own connection
    assert ledger.find_by_task(task_id).poll_count == 1


def test_a_pass_closes_every_connection_its_threads_opened(configure_emulator, client, ledger, submit):
    emulator = configure_emulator(queued_seconds=60, latency_seconds=0.05)
    submit(20)
    before = connections_to(emulator)  # the `client` fixture's own

    report = TaskPoller(client, ledger, requests_per_second=1000, concurrency=8).poll_due()

    assert report.polled == 20
    assert connections_to(emulator) == before


def test_polls_failing_in_a_row_wait_10_20_40_seconds_and_an_answer_resets_the_wait(
    configure_emulator, client, ledger, submit
):
    """Failure mode: a task polled every 10 s for as long as the API is down, whatever its history."""
    emulator = configure_emulator(queued_seconds=60)
    (task_id,) = submit(1)
    emulator.set_faults([FaultRule(endpoint="get_generation", kind="server_error", status=503)])
    poller = TaskPoller(client, ledger, clock=lambda: due_again(ledger, task_id), **FAST)

    waits = []
    for _ in range(3):
        poller.poll_due()
        record = ledger.find_by_task(task_id)
        waits.append(record.next_poll_at - record.last_polled_at)
    emulator.set_faults([])
    poller.poll_due()

    assert waits == [timedelta(seconds=s) for s in (10, 20, 40)]
    record = ledger.find_by_task(task_id)
    assert (record.poll_failures, record.next_poll_at - record.last_polled_at) == (0, timedelta(seconds=10))


def due_again(ledger: Ledger, task_id: str) -> datetime:
    """A clock that stands at the task's next poll: each pass finds it due, without waiting for real."""
    record = ledger.find_by_task(task_id)
    return max(record.next_poll_at, datetime.now(UTC))


def test_a_pass_while_the_api_is_down_costs_one_poll_and_leaves_the_rest_due(
    configure_emulator, client, ledger, submit
):
    """Failure mode: every due task polled against a dead API, each waiting out its retries, until the tick's
    time budget is gone."""
    emulator = configure_emulator(queued_seconds=0, processing_seconds=0, time_scale=100)
    task_ids = submit(20)
    emulator.set_faults([FaultRule(endpoint="api", kind="public_api_disabled", for_seconds=300)])
    before = polls(emulator)

    down = TaskPoller(client, ledger, **FAST).poll_due()

    assert down.api_unavailable and down.stopped_early and down.polled == 0
    assert polls(emulator) - before == 1  # the probe; the client of this test does not retry
    assert len(ledger.due_for_poll(datetime.now(UTC), limit=100)) == 19  # untouched, still due
    wait_until_outages_end(emulator)
    up = TaskPoller(client, ledger, **FAST).poll_due()
    assert not up.api_unavailable and up.polled == 19
    assert {ledger.find_by_task(t).status for t in task_ids} - {"succeeded"} == {"queued"}  # the probe's task waits
    assert emulator.stats()["creates_performed"] == 20


def test_a_pass_stops_after_five_failures_in_a_row_once_the_api_goes_down_midway(
    configure_emulator, client, ledger, submit
):
    emulator = configure_emulator(queued_seconds=60)
    submit(30)
    answered_once = FaultRule(endpoint="get_generation", kind="slow", delay=0.0, times=1)  # the probe gets through
    emulator.set_faults([answered_once, FaultRule(endpoint="get_generation", kind="server_error", status=503)])
    before = polls(emulator)

    report = TaskPoller(client, ledger, requests_per_second=1000, concurrency=1).poll_due()

    assert report.polled == 1 and report.api_unavailable  # the probe was answered, then five 503s in a row
    assert polls(emulator) - before == 1 + FAILURES_THAT_STOP_A_PASS
    assert len(report.errors) == FAILURES_THAT_STOP_A_PASS
