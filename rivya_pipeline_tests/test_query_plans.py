"""Every ledger statement a discovery tick, a submit run and the sensor's ticks send is served by an index, on
SQLite and PostgreSQL. The statements are the ones the code really sent (recorded at the driver), so a new query
on these paths is checked without being listed here.

Failure mode: a query that reads the whole table, cheap on a fresh instance and O(history) after a year (the
sensor ticks every few seconds, discovery every hour, on tables with a row per brief ever bought).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event

from rivya_pipeline_tests.fixtures_ledger import Backend

LEDGER_TABLES = ("rivya_tasks", "rivya_brief_files")  # a row per brief or per task ever: rivya_ledger_meta is not


@contextmanager
def ledger_statements() -> Iterator[list[tuple[str, Any]]]:
    """The SELECT, UPDATE and DELETE statements on the ledger's tables sent by any engine of this process."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if any(table in statement for table in LEDGER_TABLES) and statement.lstrip().upper().startswith(
            ("SELECT", "UPDATE", "DELETE")
        ):
            seen.append((statement, parameters[0] if executemany else parameters))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def full_scans(backend: Backend, statements: list[tuple[str, Any]]) -> dict[str, str]:
    """statement -> its plan, for each statement whose plan reads a ledger table without an index."""
    engine = create_engine(backend.driver_url)
    found = {}
    try:
        with engine.connect() as conn:
            if backend.name == "postgres":
                conn.exec_driver_sql("SET enable_seqscan = off")  # small tables: ask whether an index CAN serve it
            for statement, parameters in statements:
                if backend.name == "sqlite":
                    rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
                    plan = " | ".join(str(row[-1]) for row in rows)
                    scans = [
                        row[-1] for row in rows if str(row[-1]).startswith(tuple(f"SCAN {t}" for t in LEDGER_TABLES))
                    ]
                else:
                    rows = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters).all()
                    plan = " | ".join(str(row[0]) for row in rows)
                    scans = [row[0] for row in rows if any(f"Seq Scan on {t}" in str(row[0]) for t in LEDGER_TABLES)]
                if scans:
                    found[statement] = plan
    finally:
        engine.dispose()
    return found


def test_every_ledger_statement_of_discovery_a_submit_and_the_sensor_is_served_by_an_index(
    backend: Backend, make_pipeline
) -> None:
    # Every limit set: their checks (per run, per day, the wallet floor) are on the submit's path.
    pipeline = make_pipeline(
        ledger_url=backend.url, max_credits_per_run=900, max_credits_per_day=9000, min_wallet_credits=90
    )
    with ledger_statements() as statements:
        launched = pipeline.discover(datetime.now(UTC)).run_requests or []
        pipeline.submit(launched[0].partition_key, tags=dict(launched[0].tags))
        pipeline.tick_until(lambda ticks: any(request.job_name == "store_videos" for request in ticks[-1].run_requests))

    distinct = {statement: parameters for statement, parameters in reversed(statements)}  # each with its first values
    assert len(distinct) >= 8, statements  # the paths were really taken
    assert full_scans(backend, list(distinct.items())) == {}
