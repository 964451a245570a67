"""The spend report: what `rivya-pipeline report` prints."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Date, case, func, select, true

from ..settings import utc_now
from .database import LedgerPart
from .schema import tasks
from .spend import unknown_outcome

# What to do about a create of unknown outcome: the pipeline cannot find out, and will not pay for it again.
UNKNOWN_OUTCOME_HINT = (
    "check Rivya's dashboard or GET /api/v1/credits for a charge of its price; the pipeline will not re-send it "
    "(bump `regenerate` in the brief to pay for a new video)"
)


def sent_since(since: datetime | None) -> ColumnElement[bool]:
    return tasks.c.submitted_at >= since if since is not None else true()


class SpendReport(LedgerPart):
    def spend_report(self, now: datetime | None = None, since: datetime | None = None) -> list[dict[str, Any]]:
        """Credits per UTC day (of submit) and brief, of the creates sent `since` (None: ever); `day` is an ISO date
        string, so the rows are JSON-ready. The period is read through the index on submitted_at: a report of the
        last month costs the same after a year of history.

        `unknown_outcome` counts the creates of the row that never got an answer and were sent Rivya's idempotency
        window or longer before `now` (see `unknown_outcomes`); `unknown_outcome_credits` sums their prices, which
        `reserved` (Rivya's answer) cannot show. They are counted in `tasks` too.
        """
        day = func.date(tasks.c.submitted_at, type_=Date)  # times are stored as naive UTC: date() is the UTC day
        unknown = unknown_outcome(now or utc_now())
        query = (
            select(
                day.label("day"),
                tasks.c.brief_id,
                func.count().label("tasks"),
                func.sum(tasks.c.reserved_credits).label("reserved"),
                func.sum(tasks.c.final_credits).label("final"),
                func.sum(tasks.c.refunded_credits).label("refunded"),
                func.sum(case((unknown, 1), else_=0)).label("unknown_outcome"),
                func.sum(case((unknown, tasks.c.price_credits), else_=0)).label("unknown_outcome_credits"),
            )
            .where(sent_since(since))
            .group_by(day, tasks.c.brief_id)
            .order_by(day, tasks.c.brief_id)
        )
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return [
            {
                "day": row.day.isoformat(),
                "brief_id": row.brief_id,
                "tasks": int(row.tasks),
                "reserved": int(row.reserved),
                "final": int(row.final),
                "refunded": int(row.refunded),
                "unknown_outcome": int(row.unknown_outcome),
                "unknown_outcome_credits": int(row.unknown_outcome_credits),
            }
            for row in rows
        ]

    def unknown_outcomes(self, now: datetime | None = None, since: datetime | None = None) -> list[dict[str, Any]]:
        """Creates of unknown outcome sent `since` (None: ever), oldest first: never answered ("submitting"), and
        sent Rivya's idempotency window or longer before `now`, so nothing re-sends them and the wallet floor no
        longer holds their price.

        They may or may not have been charged; each carries the `hint` of what to do. JSON-ready, like the spend
        report. Derived from status and submitted_at at query time (both indexed): the rows are not changed.
        """
        query = (
            select(
                tasks.c.submitted_at,
                tasks.c.brief_id,
                tasks.c.price_credits,
                tasks.c.idempotency_key,
                tasks.c.run_id,
                tasks.c.model,
            )
            .where(unknown_outcome(now or utc_now()), sent_since(since))
            .order_by(tasks.c.submitted_at, tasks.c.idempotency_key)
        )
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return [
            {
                "submitted_at": row.submitted_at.isoformat(),
                "brief_id": row.brief_id,
                "price_credits": int(row.price_credits),
                "idempotency_key": row.idempotency_key,
                "run_id": row.run_id,
                "model": row.model,
                "hint": UNKNOWN_OUTCOME_HINT,
            }
            for row in rows
        ]
