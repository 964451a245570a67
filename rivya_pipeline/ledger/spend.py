"""Spend: whether a paid create may go out, its reservation, and Rivya's answer to it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, and_, delete, func, insert, select, update

from ..rivya.models import TaskStatus
from ..settings import utc_now
from .database import LedgerPart
from .schema import tasks

# A task counts against the caps unless Rivya gave its credits back (failed tasks are refunded in full). That
# includes a create that never got an answer ("submitting"), also once its outcome is unknown: it may have been
# charged, and only Rivya's answer (a failed status, a refund) could show that it was not.
COUNTS_AGAINST_CAPS = and_(tasks.c.status != TaskStatus.FAILED, tasks.c.refunded_credits == 0)
# How long Rivya keeps an idempotency key [assumed: docs/rivya-api.md section 4]. Past that a resent body would be a
# new, paid task; and a create sent that long ago is no longer in flight: whatever Rivya charged for it is in the
# wallet, so the wallet floor stops holding its price, and the report lists it as an unknown outcome.
IDEMPOTENCY_WINDOW = timedelta(hours=24)
# A lost create is re-sent only this long after it was first sent: an hour inside IDEMPOTENCY_WINDOW, so a resend
# (with its retries, minutes at most) is over before Rivya may forget the key and before the floor lets go of it.
RESEND_WINDOW = IDEMPOTENCY_WINDOW - timedelta(hours=1)


def in_flight(now: datetime) -> ColumnElement[bool]:
    """Creates sent but not answered yet, less than IDEMPOTENCY_WINDOW ago: Rivya may charge them still."""
    return and_(tasks.c.status == TaskStatus.SUBMITTING, tasks.c.submitted_at > now - IDEMPOTENCY_WINDOW)


def unknown_outcome(now: datetime) -> ColumnElement[bool]:
    """Creates never answered, sent IDEMPOTENCY_WINDOW ago or longer: charged or not, only Rivya can tell.

    The complement of `in_flight` among "submitting" rows, derived at query time (the row is not changed), on
    indexed columns only (status, submitted_at).
    """
    return and_(tasks.c.status == TaskStatus.SUBMITTING, tasks.c.submitted_at <= now - IDEMPOTENCY_WINDOW)


@dataclass(frozen=True)
class CreditLimits:
    max_credits_per_run: int | None = None  # None = no cap
    max_credits_per_day: int | None = None  # rolling 24 h
    min_wallet_credits: int = 0  # floor that must remain in the wallet after this submit


class BudgetExceeded(Exception):
    """A submit would cross a credit limit; `limit` is "per_run", "per_day" or "wallet_floor"."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(limit, message)  # both in args, so the error survives pickling between processes
        self.limit = limit
        self.message = message

    def __str__(self) -> str:
        return self.message


class StaleSubmission(Exception):
    """A create whose answer was lost is older than Rivya's idempotency window: resending could pay twice."""


@dataclass(frozen=True)
class SubmitDecision:
    action: Literal["new", "reattach", "resend"]
    idempotency_key: str
    body: dict[str, Any]  # "resend": the body stored by the first attempt, so the idempotent replay matches
    task_id: str | None  # set for "reattach"


class SpendGuard(LedgerPart):
    """Decides, in one serialized transaction, whether a paid create may go out, and reserves its price."""

    def begin_submit(
        self,
        *,
        idempotency_key: str,
        brief_id: str,
        run_id: str,
        model: str,
        price_credits: int,
        body: dict[str, Any],
        limits: CreditLimits,
        wallet_credits: Callable[[], int] | None,
        now: datetime | None = None,
    ) -> SubmitDecision:
        """Decide what to send for this key, reserving its price when it is new. Raises BudgetExceeded.

        - A row with a task id: "reattach" to that task; nothing is checked or reserved again.
        - A row without one: an earlier attempt crashed or lost its answer; "resend" its stored body under
          the same key (Rivya returns the original task and charges nothing twice). Its price already counts.
          Past RESEND_WINDOW Rivya may have forgotten the key, so that raises StaleSubmission instead.
        - No row: check the caps, insert a "submitting" row and answer "new".

        The wallet (an HTTP GET) is read inside the lock, and only when a floor is set. That serializes
        submits for one short GET, which is acceptable because creates are rate-limited anyway, and it is
        the only race-free order: the in-flight ("submitting") prices are read first, then the wallet. A
        row that is no longer in flight had its create answered, so Rivya charged it, before that read, and
        the wallet fetched afterwards already shows the charge; a row still in flight is subtracted whether
        or not Rivya charged it yet (conservative). A wallet read before the lock could predate a charge
        whose row is no longer in flight, and would then count those credits as available.

        An unanswered create leaves the in-flight sum IDEMPOTENCY_WINDOW after it was sent: nothing sends it
        any more (resends stop at RESEND_WINDOW), so any charge for it is in the wallet already, and holding
        its price as well would refuse more and more for creates that died months ago. It still counts against
        the per-run and per-day caps (COUNTS_AGAINST_CAPS), and the spend report lists it as an unknown outcome.
        """
        if limits.min_wallet_credits > 0 and wallet_credits is None:
            raise ValueError("wallet_credits: needed to enforce min_wallet_credits")
        now = now or utc_now()
        with self._db.serialized() as conn:
            row = conn.execute(
                select(tasks.c.task_id, tasks.c.body, tasks.c.submitted_at).where(
                    tasks.c.idempotency_key == idempotency_key
                )
            ).first()
            if row is not None:
                if row.task_id is not None:
                    return SubmitDecision("reattach", idempotency_key, json.loads(row.body), row.task_id)
                if now - row.submitted_at > RESEND_WINDOW:
                    raise StaleSubmission(
                        f"the create sent at {row.submitted_at:%Y-%m-%d %H:%M}Z never got an answer and is past "
                        "Rivya's 24 h idempotency window, so resending it could pay twice; check the task list in "
                        "Rivya, then bump `regenerate` in the brief to submit anew"
                    )
                return SubmitDecision("resend", idempotency_key, json.loads(row.body), None)
            _check_limits(conn, run_id=run_id, price=price_credits, limits=limits, wallet=wallet_credits, now=now)
            conn.execute(
                insert(tasks).values(
                    idempotency_key=idempotency_key,
                    brief_id=brief_id,
                    run_id=run_id,
                    model=model,
                    price_credits=price_credits,
                    body=json.dumps(body),
                    status=TaskStatus.SUBMITTING,
                    submitted_at=now,
                    updated_at=now,
                )
            )
        return SubmitDecision("new", idempotency_key, body, None)

    def record_task(
        self,
        idempotency_key: str,
        *,
        task_id: str,
        status: str,
        reserved_credits: int,
        final_credits: int,
        deadline_at: datetime | None,
        next_poll_at: datetime | None,
        now: datetime | None = None,
    ) -> None:
        """Attach Rivya's answer to the create: from now on the task is polled, never created again."""
        values = dict(
            task_id=task_id,
            status=status,
            reserved_credits=reserved_credits,
            final_credits=final_credits,
            deadline_at=deadline_at,
            next_poll_at=next_poll_at,
            updated_at=now or utc_now(),
        )
        with self._db.write() as conn:
            updated = conn.execute(update(tasks).where(tasks.c.idempotency_key == idempotency_key).values(**values))
            if updated.rowcount == 0:
                raise LookupError(f"no ledger row for idempotency key {idempotency_key!r}: begin_submit comes first")

    def release(self, idempotency_key: str) -> None:
        """Forget a create that Rivya definitively refused, so nothing stays reserved for it.

        Only a row without a task id can be released: a task Rivya accepted may cost money and must stay
        tracked.
        """
        with self._db.write() as conn:
            task_id = conn.execute(select(tasks.c.task_id).where(tasks.c.idempotency_key == idempotency_key)).scalar()
            if task_id is not None:
                raise ValueError(f"idempotency key {idempotency_key!r} has task {task_id}: an accepted task is kept")
            conn.execute(delete(tasks).where(tasks.c.idempotency_key == idempotency_key))


def _check_limits(
    conn: Connection,
    *,
    run_id: str,
    price: int,
    limits: CreditLimits,
    wallet: Callable[[], int] | None,
    now: datetime,
) -> None:
    def held(*conditions: Any) -> int:
        total = select(func.coalesce(func.sum(tasks.c.price_credits), 0)).where(*conditions)
        return int(conn.execute(total).scalar_one())

    cap = limits.max_credits_per_run
    if cap is not None:
        spent = held(COUNTS_AGAINST_CAPS, tasks.c.run_id == run_id)
        if spent + price > cap:
            raise BudgetExceeded(
                "per_run",
                f"per-run credit limit: {spent} of {cap} credits already reserved in this run, this task costs {price}",
            )
    cap = limits.max_credits_per_day
    if cap is not None:
        spent = held(COUNTS_AGAINST_CAPS, tasks.c.submitted_at > now - timedelta(hours=24))
        if spent + price > cap:
            raise BudgetExceeded(
                "per_day",
                f"per-day credit limit: {spent} of {cap} credits reserved in the last 24 h, this task costs {price}",
            )
    floor = limits.min_wallet_credits
    if floor > 0 and wallet is not None:
        in_flight_credits = held(in_flight(now))  # read BEFORE the wallet: see begin_submit
        available = wallet()
        if available - in_flight_credits - price < floor:
            raise BudgetExceeded(
                "wallet_floor",
                f"wallet floor: {available} credits in the wallet, {in_flight_credits} held by submits in flight, "
                f"this task costs {price}, and at least {floor} must remain",
            )
