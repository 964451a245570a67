"""The spend ledger: one durable, transactional record shared by every Dagster run process and the sensor.

It does two jobs no in-process object can do across processes:

- **Guard spend** (`spend.py`). `begin_submit` decides, in one serialized transaction, whether a paid create may
  go out (per-run cap, rolling 24 h cap, wallet floor) and reserves its price before any HTTP call, so 8 runs
  that submit at once cannot overshoot a cap together.
- **Track every paid task** (`tasks.py`) from "submitting" to its stored video, so a crashed step re-attaches to
  its task (or replays the identical create under the same Idempotency-Key) instead of paying twice, and the
  sensor polls a bounded batch of due tasks.

Beside them: the spend report (`report.py`) and where each brief was last seen in its folder (`brief_index.py`).
One code path (SQLAlchemy 2 Core, tables in `schema.py`) serves SQLite (default: a file in DAGSTER_HOME) and
PostgreSQL. `database.py` owns the engine and the lock: budget decisions are
serialized with `BEGIN IMMEDIATE` on SQLite and `pg_advisory_xact_lock` on PostgreSQL; both last only for the
transaction, and no lock is ever held across a create or a poll.
"""

from __future__ import annotations

from pathlib import Path

from .brief_index import BriefIndex
from .database import SUBMIT_LOCK_ID, LedgerDatabase
from .report import UNKNOWN_OUTCOME_HINT, SpendReport
from .spend import (
    IDEMPOTENCY_WINDOW,
    RESEND_WINDOW,
    BudgetExceeded,
    CreditLimits,
    SpendGuard,
    StaleSubmission,
    SubmitDecision,
)
from .tasks import StatusUpdate, StoreRetryPolicy, TaskRecord, TaskTracker


class Ledger(SpendGuard, TaskTracker, SpendReport, BriefIndex):
    """The ledger at a SQLAlchemy URL: every part of it on one shared database. Safe to open from many processes.

    A caller that needs one concern only can be typed with that part (the poller takes a TaskTracker).
    """

    def __init__(self, url: str) -> None:
        super().__init__(LedgerDatabase(url))

    @staticmethod
    def default_url(dagster_home: str | Path) -> str:
        return LedgerDatabase.default_url(dagster_home)

    def close(self) -> None:
        self._db.close()


__all__ = [
    "IDEMPOTENCY_WINDOW",
    "RESEND_WINDOW",
    "SUBMIT_LOCK_ID",
    "UNKNOWN_OUTCOME_HINT",
    "BriefIndex",
    "BudgetExceeded",
    "CreditLimits",
    "Ledger",
    "LedgerDatabase",
    "SpendGuard",
    "SpendReport",
    "StaleSubmission",
    "StatusUpdate",
    "StoreRetryPolicy",
    "SubmitDecision",
    "TaskRecord",
    "TaskTracker",
]
