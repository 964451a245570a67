"""The spend ledger on both backends: a SQLite file and the PostgreSQL server at 127.0.0.1:5432.

Every test runs twice. The race tests start 8 separate OS processes (spawn), because a cap that only holds
inside one process is exactly the bug the ledger exists to prevent.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text, update
from sqlalchemy.exc import StatementError

from rivya_pipeline.ledger import (
    RESEND_WINDOW,
    SUBMIT_LOCK_ID,
    BudgetExceeded,
    CreditLimits,
    Ledger,
    StaleSubmission,
    SubmitDecision,
)
from rivya_pipeline.ledger.schema import ledger_meta
from rivya_pipeline_tests.fixtures_postgres import PG_ADMIN_URL, PG_SERVER, admin_connection

T0 = datetime(2026, 5, 11, 12, 0, tzinfo=UTC)
PRICE = 90
RACERS = 8


@dataclass(frozen=True)
class Backend:
    name: str
    url: str  # what Ledger() gets
    driver_url: str  # the same database with an explicit driver, for side connections made by a test


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """A fresh, empty ledger location: a new SQLite file, or a new PostgreSQL schema (dropped afterwards)."""
    if request.param == "sqlite":
        url = Ledger.default_url(tmp_path_factory.mktemp("dagster_home"))
        yield Backend("sqlite", url, url)
        return
    with admin_connection() as conn:
        schema = f"ledger_{uuid.uuid4().hex[:12]}"
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        options = f"?options=-csearch_path%3D{schema}"
        try:
            yield Backend("postgres", PG_SERVER + options, PG_ADMIN_URL + options)
        finally:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')


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


def test_succeeded_unstored_until_marked_stored(ledger: Ledger) -> None:
    first = submitted_task(ledger, "first")
    second = submitted_task(ledger, "second")
    succeed(ledger, second, at=T0 + timedelta(seconds=5))
    succeed(ledger, first, at=T0 + timedelta(seconds=9))
    fail(ledger, submitted_task(ledger, "failed"))

    assert [r.task_id for r in ledger.succeeded_unstored(limit=10)] == [second, first]
    assert [r.task_id for r in ledger.succeeded_unstored(limit=1)] == [second]

    ledger.mark_stored(
        second, uri="s3://videos/brief-a/task_second.mp4", sha256="ab" * 32, now=T0 + timedelta(minutes=1)
    )

    assert [r.task_id for r in ledger.succeeded_unstored(limit=10)] == [first]
    stored = ledger.find_by_task(second)
    assert stored is not None
    assert (stored.stored_uri, stored.stored_sha256, stored.stored_at) == (
        "s3://videos/brief-a/task_second.mp4",
        "ab" * 32,
        T0 + timedelta(minutes=1),
    )


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

    assert ledger.spend_report() == [
        {"day": "2026-05-10", "brief_id": "brief-a", "tasks": 2, "reserved": 180, "final": 90, "refunded": 90},
        {"day": "2026-05-11", "brief_id": "brief-a", "tasks": 1, "reserved": 90, "final": 90, "refunded": 0},
        {"day": "2026-05-11", "brief_id": "brief-b", "tasks": 2, "reserved": 90, "final": 0, "refunded": 0},
    ]


def test_brief_versions_upsert_in_batches(ledger: Ledger) -> None:
    versions = {f"briefs/batch/{i:05d}.yaml": f"sha256:{i:064x}" for i in range(40_000)}

    ledger.record_brief_versions(versions)
    ledger.record_brief_versions({"briefs/batch/00007.yaml": "sha256:changed", "briefs/new.yaml": "sha256:new"})

    stored = ledger.brief_versions()
    assert len(stored) == 40_001
    assert stored["briefs/batch/00007.yaml"] == "sha256:changed"
    assert stored["briefs/batch/39999.yaml"] == versions["briefs/batch/39999.yaml"]
    assert stored["briefs/new.yaml"] == "sha256:new"


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
