"""The spend ledger on both backends: a SQLite file and the PostgreSQL server at 127.0.0.1:5432.

Every test runs twice. The race tests start 8 separate OS processes (spawn), because a cap that only holds
inside one process is exactly the bug the ledger exists to prevent.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, select, text, update
from sqlalchemy.exc import StatementError

from rivya_pipeline.ledger import (
    IDEMPOTENCY_WINDOW,
    RESEND_WINDOW,
    SUBMIT_LOCK_ID,
    UNKNOWN_OUTCOME_HINT,
    BudgetExceeded,
    CreditLimits,
    Ledger,
    StaleSubmission,
    StatusUpdate,
    StoreRetryPolicy,
    SubmitDecision,
)
from rivya_pipeline.ledger.schema import ledger_meta, tasks
from rivya_pipeline_tests.fixtures_ledger import Backend

T0 = datetime(2026, 5, 11, 12, 0, tzinfo=UTC)
PRICE = 90
RACERS = 8


@pytest.fixture
def ledger(backend: Backend) -> Iterator[Ledger]:
    opened = Ledger(backend.url)
    yield opened
    opened.close()


def submit(
    ledger: Ledger,
    key: str,
    *,
    run_id: str = "run-1",
    brief_id: str = "brief-a",
    price: int = PRICE,
    body: dict[str, Any] | None = None,
    limits: CreditLimits | None = None,
    wallet: Callable[[], int] | None = None,
    now: datetime = T0,
) -> SubmitDecision:
    return ledger.begin_submit(
        idempotency_key=key,
        brief_id=brief_id,
        run_id=run_id,
        model="kling-3-0",
        price_credits=price,
        body=body if body is not None else {"model": "kling-3-0", "prompt": f"prompt of {key}"},
        limits=limits or CreditLimits(),
        wallet_credits=wallet,
        now=now,
    )


def accept(
    ledger: Ledger,
    key: str,
    task_id: str,
    *,
    status: str = "queued",
    next_poll_at: datetime | None = T0,
    now: datetime = T0,
) -> None:
    """Record Rivya's answer to a create, as the submit step does."""
    ledger.record_task(
        key,
        task_id=task_id,
        status=status,
        reserved_credits=PRICE,
        final_credits=0,
        deadline_at=now + timedelta(minutes=30),
        next_poll_at=next_poll_at,
        now=now,
    )


def submitted_task(ledger: Ledger, key: str, *, next_poll_at: datetime = T0, now: datetime = T0, **kw: Any) -> str:
    """A key that went all the way to an accepted task; returns the task id."""
    assert submit(ledger, key, now=now, **kw).action == "new"
    task_id = f"task_{key}"
    accept(ledger, key, task_id, next_poll_at=next_poll_at, now=now)
    return task_id


def fail(ledger: Ledger, task_id: str, *, at: datetime = T0) -> None:
    ledger.update_status(
        task_id,
        status="failed",
        final_credits=0,
        refunded_credits=PRICE,
        error_code="generation_failed",
        error_message="model crashed",
        polled_at=at,
    )


def succeed(ledger: Ledger, task_id: str, *, at: datetime = T0) -> None:
    ledger.update_status(task_id, status="succeeded", final_credits=PRICE, refunded_credits=0, polled_at=at)


# -- submit decisions ---------------------------------------------------------------------------------


def test_first_submit_is_new_and_reserves_a_submitting_row(ledger: Ledger) -> None:
    body = {"model": "kling-3-0", "prompt": "a fox", "params": {"duration": "5", "mode": "pro"}}

    decision = submit(ledger, "key-1", body=body)

    assert decision == SubmitDecision("new", "key-1", body, None)
    record = ledger.get("key-1")
    assert record is not None
    assert (record.status, record.price_credits, record.task_id, record.brief_id, record.run_id) == (
        "submitting",
        PRICE,
        None,
        "brief-a",
        "run-1",
    )
    assert record.submitted_at == T0 and record.submitted_at.tzinfo is not None


def test_a_key_without_task_id_resends_the_first_body_without_a_new_check(ledger: Ledger) -> None:
    first = {"prompt": "Füchse im Schnee ✓", "params": {"z": "1", "a": ["x", {"n": None}]}, "model": "kling-3-0"}
    submit(ledger, "key-1", body=first)

    again = submit(ledger, "key-1", body={"prompt": "changed"}, limits=CreditLimits(max_credits_per_run=0))

    assert again.action == "resend"
    assert again.task_id is None
    assert json.dumps(again.body) == json.dumps(first)  # same keys, same order, same values
    assert ledger.count_by_status() == {"submitting": 1}  # nothing reserved twice


def test_a_lost_create_older_than_the_idempotency_window_is_not_resent(ledger: Ledger) -> None:
    submit(ledger, "key-1")
    assert submit(ledger, "key-1", now=T0 + RESEND_WINDOW).action == "resend"

    with pytest.raises(StaleSubmission, match="24 h idempotency window.*regenerate"):
        submit(ledger, "key-1", now=T0 + RESEND_WINDOW + timedelta(seconds=1))
    assert ledger.count_by_status() == {"submitting": 1}  # kept, so its price still counts and it is not retried


def test_a_key_with_task_id_reattaches_without_a_new_check(ledger: Ledger) -> None:
    task_id = submitted_task(ledger, "key-1")

    decision = submit(ledger, "key-1", limits=CreditLimits(max_credits_per_run=0, max_credits_per_day=0))

    assert (decision.action, decision.task_id) == ("reattach", task_id)
    assert ledger.count_by_status() == {"queued": 1}


def test_release_removes_the_reservation(ledger: Ledger) -> None:
    one_task = CreditLimits(max_credits_per_run=PRICE)
    submit(ledger, "refused", limits=one_task)
    with pytest.raises(BudgetExceeded):
        submit(ledger, "next", limits=one_task)

    ledger.release("refused")

    assert ledger.get("refused") is None
    assert submit(ledger, "next", limits=one_task).action == "new"


def test_release_keeps_a_task_that_rivya_accepted(ledger: Ledger) -> None:
    task_id = submitted_task(ledger, "key-1")

    with pytest.raises(ValueError, match=f"has task {task_id}"):
        ledger.release("key-1")

    assert ledger.find_by_task(task_id) is not None


def test_record_task_needs_a_submit_first(ledger: Ledger) -> None:
    with pytest.raises(LookupError, match="begin_submit comes first"):
        accept(ledger, "never-submitted", "task_x")


def test_naive_datetimes_are_refused(ledger: Ledger) -> None:
    with pytest.raises(StatementError, match="timezone-aware"):
        submit(ledger, "key-1", now=datetime(2026, 5, 11, 12, 0))


# -- caps -----------------------------------------------------------------------------------------------


def test_per_run_cap_counts_this_run_only_and_names_the_numbers(ledger: Ledger) -> None:
    limits = CreditLimits(max_credits_per_run=200)
    submit(ledger, "a1", run_id="run-a", limits=limits)
    submit(ledger, "a2", run_id="run-a", limits=limits)

    with pytest.raises(BudgetExceeded) as refused:
        submit(ledger, "a3", run_id="run-a", limits=limits)

    assert refused.value.limit == "per_run"
    assert str(refused.value) == (
        "per-run credit limit: 180 of 200 credits already reserved in this run, this task costs 90"
    )
    assert ledger.get("a3") is None
    assert submit(ledger, "b1", run_id="run-b", limits=limits).action == "new"


def test_per_run_cap_does_not_count_refunded_tasks(ledger: Ledger) -> None:
    limits = CreditLimits(max_credits_per_run=PRICE)
    fail(ledger, submitted_task(ledger, "failed-one", limits=limits))

    assert submit(ledger, "second", limits=limits).action == "new"


def test_per_day_cap_is_a_rolling_24_hours_of_unrefunded_spend(ledger: Ledger) -> None:
    limits = CreditLimits(max_credits_per_day=3 * PRICE)
    submit(ledger, "25h-ago", run_id="r1", now=T0 - timedelta(hours=25))
    submit(ledger, "23h-ago", run_id="r2", now=T0 - timedelta(hours=23))
    fail(ledger, submitted_task(ledger, "refunded", run_id="r3", now=T0 - timedelta(hours=1)))
    submit(ledger, "1h-ago", run_id="r4", now=T0 - timedelta(hours=1))

    assert submit(ledger, "now", run_id="r5", limits=limits).action == "new"
    with pytest.raises(BudgetExceeded) as refused:
        submit(ledger, "one-too-many", run_id="r6", limits=limits)

    assert refused.value.limit == "per_day"
    assert (
        str(refused.value) == "per-day credit limit: 270 of 270 credits reserved in the last 24 h, this task costs 90"
    )
    # Two hours later the row from 23 h ago has left the window.
    assert submit(ledger, "later", run_id="r7", limits=limits, now=T0 + timedelta(hours=2)).action == "new"


def test_wallet_floor_subtracts_submits_still_in_flight(ledger: Ledger) -> None:
    limits = CreditLimits(min_wallet_credits=150)

    def wallet() -> int:
        return 300

    assert submit(ledger, "first", limits=limits, wallet=wallet).action == "new"  # 300 - 0 - 90 >= 150
    with pytest.raises(BudgetExceeded) as refused:
        submit(ledger, "second", limits=limits, wallet=wallet)  # 300 - 90 in flight - 90 < 150

    assert refused.value.limit == "wallet_floor"
    assert str(refused.value) == (
        "wallet floor: 300 credits in the wallet, 90 held by submits in flight, this task costs 90, "
        "and at least 150 must remain"
    )
    # Once Rivya answered the first create, the wallet it reports already shows that charge.
    accept(ledger, "first", "task_first")
    assert submit(ledger, "second", limits=limits, wallet=wallet).action == "new"


def test_an_unanswered_create_stops_holding_the_wallet_floor_once_the_idempotency_window_passed(
    ledger: Ledger,
) -> None:
    """A create whose answer never came is charged (and in the wallet) or never will be, once Rivya forgot its key."""
    limits = CreditLimits(min_wallet_credits=150)

    def wallet() -> int:
        return 300

    assert submit(ledger, "lost", run_id="dead-run", limits=limits, wallet=wallet).action == "new"  # never answered
    with pytest.raises(BudgetExceeded) as refused:
        submit(ledger, "next", run_id="run-2", limits=limits, wallet=wallet, now=T0 + timedelta(hours=12))
    assert "90 held by submits in flight" in str(refused.value)

    admitted = submit(ledger, "next", run_id="run-2", limits=limits, wallet=wallet, now=T0 + IDEMPOTENCY_WINDOW)

    assert admitted.action == "new"
    lost = ledger.get("lost")
    assert lost is not None and lost.status == "submitting"  # derived at query time: the row is not changed


def test_an_unanswered_create_holds_the_wallet_floor_until_the_last_second_of_the_idempotency_window(
    ledger: Ledger,
) -> None:
    limits = CreditLimits(min_wallet_credits=150)

    def wallet() -> int:
        return 300

    submit(ledger, "lost", limits=limits, wallet=wallet)
    with pytest.raises(BudgetExceeded) as refused:
        submit(ledger, "next", limits=limits, wallet=wallet, now=T0 + IDEMPOTENCY_WINDOW - timedelta(seconds=1))

    assert refused.value.limit == "wallet_floor"
    assert "90 held by submits in flight" in str(refused.value)
    assert ledger.get("next") is None


def test_an_unanswered_create_past_the_idempotency_window_still_counts_against_the_caps(ledger: Ledger) -> None:
    """Leaving the floor is no refund: it may have been charged, so the per-run and per-day caps keep counting it."""
    submit(ledger, "lost", run_id="long-run", now=T0)
    one_task_a_run = CreditLimits(max_credits_per_run=PRICE)
    one_task_a_day = CreditLimits(max_credits_per_day=PRICE)

    # Its whole 24 h, like any spend: the per-day cap does not let it go before the floor does.
    with pytest.raises(BudgetExceeded) as per_day:
        submit(
            ledger, "same-day", run_id="r2", limits=one_task_a_day, now=T0 + IDEMPOTENCY_WINDOW - timedelta(seconds=1)
        )
    assert str(per_day.value).startswith("per-day credit limit: 90 of 90 credits reserved in the last 24 h")
    # Past the window the floor lets go of it, but its run's cap still counts it.
    with pytest.raises(BudgetExceeded) as per_run:
        submit(
            ledger,
            "same-run",
            run_id="long-run",
            limits=one_task_a_run,
            now=T0 + IDEMPOTENCY_WINDOW + timedelta(hours=1),
        )
    assert per_run.value.limit == "per_run"
    assert str(per_run.value).startswith("per-run credit limit: 90 of 90 credits already reserved in this run")
    # And the report keeps it in the spend of the day it was sent.
    (row,) = ledger.spend_report(T0 + IDEMPOTENCY_WINDOW)
    assert (row["day"], row["tasks"], row["unknown_outcome"], row["unknown_outcome_credits"]) == (
        "2026-05-11",
        1,
        1,
        PRICE,
    )


def test_wallet_is_read_only_when_a_floor_is_set(ledger: Ledger) -> None:
    def wallet_must_not_be_read() -> int:
        raise AssertionError("wallet read without a floor")

    assert submit(ledger, "key-1", wallet=wallet_must_not_be_read).action == "new"
    with pytest.raises(ValueError, match="wallet_credits"):
        submit(ledger, "key-2", limits=CreditLimits(min_wallet_credits=1), wallet=None)
    assert ledger.get("key-2") is None


def test_wallet_is_read_while_the_submit_lock_is_held(ledger: Ledger, backend: Backend) -> None:
    """Another connection must not be able to take the budget lock during the wallet GET."""
    other_could_lock: list[bool] = []

    def wallet() -> int:
        other_could_lock.append(_another_connection_can_take_submit_lock(backend))
        return 1000

    submit(ledger, "key-1", limits=CreditLimits(min_wallet_credits=1), wallet=wallet)

    assert other_could_lock == [False]
    assert _another_connection_can_take_submit_lock(backend)  # and it is released with the transaction


def _another_connection_can_take_submit_lock(backend: Backend) -> bool:
    if backend.name == "sqlite":
        conn = sqlite3.connect(make_url(backend.url).database, timeout=0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc)
            return False
        finally:
            conn.close()
    engine = create_engine(backend.driver_url)
    try:
        with engine.begin() as conn:
            return bool(conn.execute(text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": SUBMIT_LOCK_ID}).scalar())
    finally:
        engine.dispose()


def test_budget_exceeded_survives_pickling() -> None:
    error = BudgetExceeded("per_day", "per-day credit limit: 270 of 270 credits reserved in the last 24 h")

    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes

    assert (copy.limit, str(copy)) == ("per_day", str(error))


# -- the race: 8 processes against one cap ------------------------------------------------------------------


def _race_submit(url: str, key: str, limits: CreditLimits, barrier: Any, results: Any) -> None:
    """One racer in its own process: open the ledger, wait for all others, then submit at once."""
    ledger = Ledger(url)
    try:
        barrier.wait(timeout=60)
        decision = submit(ledger, key, run_id=f"run-{key}", limits=limits, wallet=lambda: 3 * PRICE + 1)
        results.put(decision.action)
    except BudgetExceeded as exc:
        results.put(exc)
    except Exception as exc:  # reported, so a broken racer fails the test instead of hanging it
        results.put(f"{type(exc).__name__}: {exc}")
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("limits", "limit_name"),
    [
        (CreditLimits(max_credits_per_day=3 * PRICE), "per_day"),
        (CreditLimits(min_wallet_credits=1), "wallet_floor"),  # wallet 271: three 90s in flight leave 1
    ],
    ids=["per_day", "wallet_floor"],
)
def test_eight_processes_submitting_at_once_cannot_cross_a_cap(
    backend: Backend, limits: CreditLimits, limit_name: str
) -> None:
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(RACERS)
    results = spawn.Queue()
    racers = [
        spawn.Process(target=_race_submit, args=(backend.url, f"racer-{i}", limits, barrier, results))
        for i in range(RACERS)
    ]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=120) for _ in racers]
    for racer in racers:
        racer.join(timeout=60)

    assert sorted(o if isinstance(o, str) else o.limit for o in outcomes) == ["new"] * 3 + [limit_name] * 5
    assert [racer.exitcode for racer in racers] == [0] * RACERS
    ledger = Ledger(backend.url)
    try:
        assert ledger.count_by_status() == {"submitting": 3}
    finally:
        ledger.close()


# -- polling support -------------------------------------------------------------------------------------


def test_due_for_poll_returns_due_tasks_most_overdue_first_up_to_the_limit(ledger: Ledger) -> None:
    late = submitted_task(ledger, "late", next_poll_at=T0 - timedelta(seconds=30))
    later = submitted_task(ledger, "later", next_poll_at=T0 - timedelta(seconds=10))
    submitted_task(ledger, "just-due", next_poll_at=T0)
    submitted_task(ledger, "not-yet", next_poll_at=T0 + timedelta(seconds=1))
    succeed(ledger, submitted_task(ledger, "finished", next_poll_at=T0 - timedelta(minutes=5)))
    submit(ledger, "no-task-id")

    assert [r.idempotency_key for r in ledger.due_for_poll(T0, limit=10)] == ["late", "later", "just-due"]
    assert [r.task_id for r in ledger.due_for_poll(T0, limit=2)] == [late, later]


def test_update_status_records_the_poll(ledger: Ledger) -> None:
    task_id = submitted_task(ledger, "key-1")
    next_poll = T0 + timedelta(seconds=8)

    ledger.update_status(
        task_id, status="processing", final_credits=0, refunded_credits=0, next_poll_at=next_poll, polled_at=T0
    )
    fail(ledger, task_id, at=T0 + timedelta(seconds=8))

    record = ledger.find_by_task(task_id)
    assert record is not None
    assert (record.status, record.poll_count, record.refunded_credits, record.final_credits) == ("failed", 2, 90, 0)
    assert (record.error_code, record.error_message) == ("generation_failed", "model crashed")
    assert record.last_polled_at == T0 + timedelta(seconds=8)
    assert record.next_poll_at is None


def test_a_stale_poll_never_undoes_a_terminal_status(ledger: Ledger) -> None:
    task_id = submitted_task(ledger, "key-1")
    succeed(ledger, task_id)

    ledger.update_status(
        task_id, status="processing", final_credits=0, refunded_credits=0, polled_at=T0, next_poll_at=T0
    )

    record = ledger.find_by_task(task_id)
    assert record is not None
    assert (record.status, record.final_credits, record.poll_count) == ("succeeded", PRICE, 1)


def test_updates_of_an_unknown_task_raise(ledger: Ledger) -> None:
    with pytest.raises(LookupError, match="task_missing"):
        succeed(ledger, "task_missing")
    with pytest.raises(LookupError, match="task_missing"):
        ledger.mark_timed_out("task_missing", T0)
    with pytest.raises(LookupError, match="task_missing"):
        ledger.mark_stored("task_missing", uri="s3://b/k.mp4", sha256="0" * 64)


def test_mark_timed_out_stops_polling_but_keeps_a_finished_task(ledger: Ledger) -> None:
    stuck = submitted_task(ledger, "stuck")
    done = submitted_task(ledger, "done")
    succeed(ledger, done)

    ledger.mark_timed_out(stuck, T0 + timedelta(hours=1))
    ledger.mark_timed_out(done, T0 + timedelta(hours=1))

    stuck_record, done_record = ledger.find_by_task(stuck), ledger.find_by_task(done)
    assert stuck_record is not None and done_record is not None
    assert (stuck_record.status, stuck_record.error_code, stuck_record.next_poll_at) == ("timed_out", "timed_out", None)
    assert done_record.status == "succeeded"
    assert ledger.due_for_poll(T0 + timedelta(days=1), limit=10) == []


def test_unanswered_submits_are_the_submitting_rows_sent_in_the_window_oldest_first(ledger: Ledger) -> None:
    minute = timedelta(minutes=1)
    for key, sent in [
        ("older", T0 - 20 * minute),
        ("old", T0 - 11 * minute),
        ("fresh", T0 - 9 * minute),
        ("forgotten", T0 - 24 * 60 * minute),
    ]:
        submit(ledger, key, brief_id=f"brief-{key}", now=sent)
    submitted_task(ledger, "answered", now=T0 - 30 * minute)

    window = {"sent_after": T0 - 23 * 60 * minute, "sent_before": T0 - 10 * minute}
    assert [r.idempotency_key for r in ledger.unanswered_submits(**window, limit=10)] == ["older", "old"]
    assert [r.idempotency_key for r in ledger.unanswered_submits(**window, limit=1)] == ["older"]


def test_store_queue_holds_succeeded_videos_until_stored_longest_waiting_first(ledger: Ledger) -> None:
    first = submitted_task(ledger, "first")
    second = submitted_task(ledger, "second")
    succeed(ledger, second, at=T0 + timedelta(seconds=5))
    succeed(ledger, first, at=T0 + timedelta(seconds=9))
    fail(ledger, submitted_task(ledger, "failed"))
    later = T0 + timedelta(minutes=1)

    assert [r.task_id for r in ledger.due_for_store(later, limit=10)] == [second, first]
    assert [r.task_id for r in ledger.due_for_store(later, limit=1)] == [second]
    assert ledger.due_for_store(T0 + timedelta(seconds=6), limit=10)[0].task_id == second  # first not due yet

    ledger.mark_stored(second, uri="s3://videos/brief-a/task_second.mp4", sha256="ab" * 32, now=later)

    assert [r.task_id for r in ledger.due_for_store(later, limit=10)] == [first]
    stored = ledger.find_by_task(second)
    assert stored is not None
    assert (stored.stored_uri, stored.stored_sha256, stored.stored_at, stored.store_due_at) == (
        "s3://videos/brief-a/task_second.mp4",
        "ab" * 32,
        later,
        None,
    )


def test_a_success_recorded_again_keeps_its_place_and_attempts_in_the_store_queue(ledger: Ledger) -> None:
    task = submitted_task(ledger, "key")
    succeed(ledger, task, at=T0)
    ledger.record_store_failure(task, error="media host 503", retry=StoreRetryPolicy(), now=T0)

    succeed(ledger, task, at=T0 + timedelta(seconds=30))  # the store step saw the success again

    record = ledger.find_by_task(task)
    assert record is not None
    assert (record.store_queued_at, record.store_attempts) == (T0, 1)
    assert record.store_due_at == T0 + timedelta(minutes=1)


def test_a_failed_store_waits_1_2_4_minutes_capped_and_is_not_due_meanwhile(ledger: Ledger) -> None:
    """Failure mode: retrying at once inside an outage spent every attempt within minutes (3 in 145 s)."""
    task = submitted_task(ledger, "key")
    succeed(ledger, task, at=T0)
    policy = StoreRetryPolicy(first_wait=timedelta(minutes=1), max_wait=timedelta(minutes=4))
    waits, now = [], T0
    for _ in range(5):
        record = ledger.record_store_failure(task, error="S3 SlowDown", retry=policy, now=now)
        assert record is not None and record.store_due_at is not None
        waits.append(record.store_due_at - now)
        assert ledger.due_for_store(record.store_due_at - timedelta(seconds=1), limit=10) == []
        assert [r.task_id for r in ledger.due_for_store(record.store_due_at, limit=10)] == [task]
        now = record.store_due_at

    assert waits == [timedelta(minutes=m) for m in (1, 2, 4, 4, 4)]
    assert record.store_attempts == 5 and record.store_error == "S3 SlowDown"


def test_a_video_whose_store_window_ran_out_leaves_the_queue_and_is_reported(ledger: Ledger) -> None:
    """Failure mode: a video given up on kept its place at the head of the queue and starved newer ones."""
    old = submitted_task(ledger, "old")
    succeed(ledger, old, at=T0)
    policy = StoreRetryPolicy(first_wait=timedelta(minutes=30), max_wait=timedelta(hours=1), window=timedelta(hours=2))
    now, record = T0, None
    while record is None or record.store_due_at is not None:
        record = ledger.record_store_failure(old, error="media host 503", retry=policy, now=now)
        assert record is not None
        now = record.store_due_at or now
    assert record.store_gave_up_at is not None and record.store_attempts == 3  # 30 min, 1 h, then past 2 h
    new = submitted_task(ledger, "new")
    succeed(ledger, new, at=T0 + timedelta(hours=3))

    assert [r.task_id for r in ledger.due_for_store(T0 + timedelta(days=30), limit=1)] == [new]
    assert [r.task_id for r in ledger.gave_up_storing()] == [old]

    ledger.mark_stored(old, uri="s3://videos/brief-a/task_old.mp4", sha256="cd" * 32)  # a person stored it by hand
    assert ledger.gave_up_storing() == []


def test_a_refused_result_is_given_up_at_once_and_a_failed_task_is_never_queued(ledger: Ledger) -> None:
    refused = submitted_task(ledger, "refused")
    succeed(ledger, refused)
    failed = submitted_task(ledger, "failed")
    fail(ledger, failed)

    record = ledger.record_store_failure(refused, error="private address", retry=StoreRetryPolicy(), give_up=True)
    not_queued = ledger.record_store_failure(failed, error="task failed", retry=StoreRetryPolicy())

    assert record is not None and (record.store_due_at, record.store_attempts) == (None, 1)
    assert not_queued is not None and (not_queued.store_due_at, not_queued.store_attempts) == (None, 0)
    assert ledger.record_store_failure("task_unknown", error="?", retry=StoreRetryPolicy()) is None
    assert ledger.due_for_store(T0 + timedelta(days=2), limit=10) == []


def test_poll_failures_in_a_row_are_counted_and_reset_by_an_answer(ledger: Ledger) -> None:
    task = submitted_task(ledger, "key")
    for failures in (1, 2):
        ledger.update_statuses([StatusUpdate(task, "queued", 0, 0, T0, T0, poll_failures=failures)])
    record = ledger.find_by_task(task)
    assert record is not None and record.poll_failures == 2

    ledger.update_statuses([StatusUpdate(task, "processing", 0, 0, T0, T0)])

    record = ledger.find_by_task(task)
    assert record is not None and (record.poll_failures, record.status) == (0, "processing")


def query_plan(ledger: Ledger, backend: Backend, query: Any) -> str:
    """The database's plan for `query`, as text: SQLite's EXPLAIN QUERY PLAN or PostgreSQL's EXPLAIN."""
    engine = create_engine(backend.driver_url)
    compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
    try:
        with engine.connect() as conn:
            if backend.name == "sqlite":
                return " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
            conn.exec_driver_sql("SET enable_seqscan = off")  # an empty table: ask whether an index CAN serve it
            return " ".join(str(row[0]) for row in conn.exec_driver_sql(f"EXPLAIN {compiled}"))
    finally:
        engine.dispose()


def test_the_store_queue_is_read_through_its_index(ledger: Ledger, backend: Backend) -> None:
    """Failure mode: a queue that scans every stored video of the instance's history on every tick."""
    query = select(tasks).where(tasks.c.store_due_at <= T0).order_by(tasks.c.store_due_at).limit(200)

    plan = query_plan(ledger, backend, query)

    assert "ix_rivya_tasks_store_due" in plan, plan


def test_a_version_1_ledger_is_migrated_and_its_unstored_videos_are_due(backend: Backend) -> None:
    """Failure mode: an upgrade that forgets the paid videos an older version had not stored yet."""
    engine = create_engine(backend.driver_url)
    with engine.begin() as conn:
        for statement in VERSION_1_SCHEMA:
            conn.exec_driver_sql(statement)
    engine.dispose()

    ledger = Ledger(backend.url)
    try:
        due = ledger.due_for_store(T0 + timedelta(days=1), limit=10)
        assert [(r.task_id, r.store_due_at, r.store_attempts) for r in due] == [("task_unstored", T0, 0)]
        stored = ledger.find_by_task("task_stored")
        assert stored is not None and stored.store_due_at is None
        plan = query_plan(ledger, backend, select(tasks).where(tasks.c.store_due_at <= T0))
        assert "ix_rivya_tasks_store_due" in plan, plan
    finally:
        ledger.close()


_V1_COLUMNS = (
    "idempotency_key VARCHAR(200) PRIMARY KEY, brief_id VARCHAR(500) NOT NULL, run_id VARCHAR(200) NOT NULL, "
    "model VARCHAR(200) NOT NULL, price_credits INTEGER NOT NULL, body TEXT NOT NULL, task_id VARCHAR(200) UNIQUE, "
    "status VARCHAR(32) NOT NULL, reserved_credits INTEGER NOT NULL, final_credits INTEGER NOT NULL, "
    "refunded_credits INTEGER NOT NULL, error_code VARCHAR(200), error_message TEXT, submitted_at TIMESTAMP NOT NULL, "
    "updated_at TIMESTAMP NOT NULL, deadline_at TIMESTAMP, next_poll_at TIMESTAMP, last_polled_at TIMESTAMP, "
    "poll_count INTEGER NOT NULL, stored_uri TEXT, stored_sha256 VARCHAR(64), stored_at TIMESTAMP"
)
VERSION_1_SCHEMA = [
    "CREATE TABLE rivya_ledger_meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)",
    "INSERT INTO rivya_ledger_meta VALUES ('schema_version', '1')",
    f"CREATE TABLE rivya_tasks ({_V1_COLUMNS})",
    "INSERT INTO rivya_tasks VALUES ('unstored', 'brief-unstored', 'run-1', 'kling-3-0', 90, '{}', 'task_unstored', "
    "'succeeded', 90, 90, 0, NULL, NULL, '2026-05-11 12:00:00', '2026-05-11 12:00:00', NULL, NULL, NULL, 3, "
    "NULL, NULL, NULL)",
    "INSERT INTO rivya_tasks VALUES ('stored', 'brief-stored', 'run-1', 'kling-3-0', 90, '{}', 'task_stored', "
    "'succeeded', 90, 90, 0, NULL, NULL, '2026-05-11 12:00:00', '2026-05-11 12:00:00', NULL, NULL, NULL, 3, "
    "'s3://v/x.mp4', 'ab', '2026-05-11 12:05:00')",
]


def test_count_by_status_and_latest_for_brief(ledger: Ledger) -> None:
    submit(ledger, "old", brief_id="brief-a", now=T0 - timedelta(hours=2))
    submitted_task(ledger, "new", brief_id="brief-a")
    submit(ledger, "other", brief_id="brief-b", now=T0 + timedelta(hours=1))

    latest = ledger.latest_for_brief("brief-a")
    assert latest is not None and latest.idempotency_key == "new"
    assert ledger.latest_for_brief("brief-unknown") is None
    assert ledger.count_by_status() == {"submitting": 2, "queued": 1}


# -- reports and the brief registry -----------------------------------------------------------------------


def test_spend_report_sums_per_utc_day_and_brief(ledger: Ledger) -> None:
    day_before = T0 - timedelta(days=1)
    succeed(ledger, submitted_task(ledger, "a1", brief_id="brief-a", run_id="r1", now=day_before))
    fail(ledger, submitted_task(ledger, "a2", brief_id="brief-a", run_id="r1", now=day_before))
    succeed(ledger, submitted_task(ledger, "a3", brief_id="brief-a", run_id="r2"))
    submitted_task(ledger, "b1", brief_id="brief-b", run_id="r2")
    # 23:59:59 UTC written with a +02:00 offset still belongs to the UTC day of T0.
    submit(ledger, "b2", brief_id="brief-b", run_id="r3", now=datetime.fromisoformat("2026-05-12T01:59:59+02:00"))

    nothing_unknown = {"unknown_outcome": 0, "unknown_outcome_credits": 0}
    assert ledger.spend_report(T0 + timedelta(hours=12)) == [
        {"day": "2026-05-10", "brief_id": "brief-a", "tasks": 2, "reserved": 180, "final": 90, "refunded": 90}
        | nothing_unknown,
        {"day": "2026-05-11", "brief_id": "brief-a", "tasks": 1, "reserved": 90, "final": 90, "refunded": 0}
        | nothing_unknown,
        {"day": "2026-05-11", "brief_id": "brief-b", "tasks": 2, "reserved": 90, "final": 0, "refunded": 0}
        | nothing_unknown,
    ]


def test_spend_report_lists_an_unanswered_create_past_the_idempotency_window_as_unknown_outcome(
    ledger: Ledger,
) -> None:
    """Such a create has no reserved credits (Rivya never answered): without this it was invisible in the report."""
    day_before = T0 - timedelta(days=1)
    submit(ledger, "lost-1", brief_id="brief-a", run_id="r1", now=day_before)
    submit(ledger, "lost-2", brief_id="brief-a", run_id="r1", price=45, now=day_before + timedelta(hours=1))
    succeed(ledger, submitted_task(ledger, "answered", brief_id="brief-a", run_id="r1", now=day_before))
    fail(ledger, submitted_task(ledger, "refunded", brief_id="brief-b", run_id="r1", now=day_before))
    submit(ledger, "fresh", brief_id="brief-b", run_id="r2", now=T0)

    rows = ledger.spend_report(T0 + timedelta(hours=1))
    unknown = ledger.unknown_outcomes(T0 + timedelta(hours=1))

    assert [
        (r["day"], r["brief_id"], r["tasks"], r["unknown_outcome"], r["unknown_outcome_credits"]) for r in rows
    ] == [
        ("2026-05-10", "brief-a", 3, 2, PRICE + 45),
        ("2026-05-10", "brief-b", 1, 0, 0),
        ("2026-05-11", "brief-b", 1, 0, 0),  # still in flight
    ]
    assert unknown == [
        {
            "submitted_at": "2026-05-10T12:00:00+00:00",
            "brief_id": "brief-a",
            "price_credits": PRICE,
            "idempotency_key": "lost-1",
            "run_id": "r1",
            "model": "kling-3-0",
            "hint": UNKNOWN_OUTCOME_HINT,
        },
        {
            "submitted_at": "2026-05-10T13:00:00+00:00",
            "brief_id": "brief-a",
            "price_credits": 45,
            "idempotency_key": "lost-2",
            "run_id": "r1",
            "model": "kling-3-0",
            "hint": UNKNOWN_OUTCOME_HINT,
        },
    ]
    assert "GET /api/v1/credits" in UNKNOWN_OUTCOME_HINT and "will not re-send" in UNKNOWN_OUTCOME_HINT
    # One second before the window closes it is still in flight, not unknown; and nothing in the rows changed.
    assert [r["idempotency_key"] for r in ledger.unknown_outcomes(day_before + IDEMPOTENCY_WINDOW)] == ["lost-1"]
    almost = day_before + IDEMPOTENCY_WINDOW - timedelta(seconds=1)
    assert ledger.unknown_outcomes(almost) == []
    assert sum(r["unknown_outcome"] for r in ledger.spend_report(almost)) == 0
    assert ledger.count_by_status() == {"submitting": 3, "succeeded": 1, "failed": 1}


def test_the_resend_window_closes_before_the_idempotency_window() -> None:
    """The floor lets go of a create only when nothing can still be re-sending it."""
    assert RESEND_WINDOW < IDEMPOTENCY_WINDOW == timedelta(hours=24)


# -- opening ----------------------------------------------------------------------------------------------


def test_reopening_keeps_the_data_and_refuses_an_unknown_schema_version(ledger: Ledger, backend: Backend) -> None:
    submit(ledger, "key-1")
    reopened = Ledger(backend.url)
    assert reopened.get("key-1") is not None
    reopened.close()

    engine = create_engine(backend.driver_url)
    with engine.begin() as conn:
        conn.execute(update(ledger_meta).where(ledger_meta.c.key == "schema_version").values(value="999"))
    engine.dispose()

    with pytest.raises(RuntimeError, match="schema version 999"):
        Ledger(backend.url)


def test_default_url_is_a_sqlite_file_in_dagster_home(tmp_path: Any) -> None:
    url = Ledger.default_url(tmp_path / "home")

    ledger = Ledger(url)
    ledger.close()

    assert url == f"sqlite:///{tmp_path}/home/rivya_ledger.sqlite"
    assert (tmp_path / "home" / "rivya_ledger.sqlite").is_file()
