"""The spend report: what `rivya-pipeline report` prints."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Date, func, select

from .database import LedgerPart
from .schema import tasks


class SpendReport(LedgerPart):
    def spend_report(self) -> list[dict[str, Any]]:
        """Credits per UTC day (of submit) and brief; `day` is an ISO date string, so the rows are JSON-ready."""
        day = func.date(tasks.c.submitted_at, type_=Date)  # times are stored as naive UTC: date() is the UTC day
        query = (
            select(
                day.label("day"),
                tasks.c.brief_id,
                func.count().label("tasks"),
                func.sum(tasks.c.reserved_credits).label("reserved"),
                func.sum(tasks.c.final_credits).label("final"),
                func.sum(tasks.c.refunded_credits).label("refunded"),
            )
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
            }
            for row in rows
        ]
