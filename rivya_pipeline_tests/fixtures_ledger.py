"""A ledger of its own for each test: a SQLite file in the test's temporary folder, or (`backend`) a fresh
location on either SQLite or PostgreSQL, for the tests that hold on both (test_ledger.py runs every ledger test
on both, with a `ledger` fixture of its own)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rivya_pipeline.ledger import Ledger
from rivya_pipeline_tests.fixtures_postgres import PG_ADMIN_URL, PG_SERVER, admin_connection


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(Ledger.default_url(tmp_path))
    yield opened
    opened.close()


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
