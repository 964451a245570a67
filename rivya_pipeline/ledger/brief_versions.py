"""The brief registry: which version of each brief was launched last, for the discovery schedule's change detection."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from ..settings import utc_now
from .database import LedgerPart
from .schema import brief_versions


class BriefRegistry(LedgerPart):
    def brief_versions(self) -> dict[str, str]:
        """brief_id -> the content hash registered last."""
        with self._db.read() as conn:
            rows = conn.execute(select(brief_versions.c.brief_id, brief_versions.c.content_hash))
            return {brief_id: content_hash for brief_id, content_hash in rows}

    def record_brief_versions(self, versions: dict[str, str], now: datetime | None = None) -> None:
        """Upsert brief_id -> content hash in one transaction, in batches.

        One INSERT carrying tens of thousands of rows fails on SQLite with "too many SQL variables". The
        RETURNING clause makes SQLAlchemy run this executemany as "insertmanyvalues": multi-row INSERTs of
        at most 1000 rows, kept under the backend's parameter limit (999 on old SQLite builds). Without
        RETURNING, SQLAlchemy sends an upsert row by row, one round trip each on PostgreSQL.
        """
        if not versions:
            return
        now = now or utc_now()
        stmt = (sqlite.insert if self._db.is_sqlite else postgresql.insert)(brief_versions)
        upsert = stmt.on_conflict_do_update(
            index_elements=[brief_versions.c.brief_id],
            set_={"content_hash": stmt.excluded.content_hash, "registered_at": stmt.excluded.registered_at},
        ).returning(brief_versions.c.brief_id)
        rows = [{"brief_id": b, "content_hash": h, "registered_at": now} for b, h in versions.items()]
        with self._db.write() as conn:
            conn.execute(upsert, rows).close()
