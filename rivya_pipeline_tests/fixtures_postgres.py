"""The machine's PostgreSQL (127.0.0.1:5432, trust auth): fresh databases and a Dagster instance of the
production profile on them, for the scale-out and money-safety tests."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import Connection, create_engine
from sqlalchemy.exc import OperationalError

from rivya_pipeline.settings import REPO_ROOT

PG_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
PROFILE = REPO_ROOT / "deploy" / "dagster.yaml"


@contextmanager
def admin_connection() -> Iterator[Connection]:
    """An autocommit connection for CREATE/DROP; the test is skipped only when the server is unreachable."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        conn = admin.connect()
    except OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is unreachable: {exc.orig}")
    try:
        yield conn
    finally:
        conn.close()
        admin.dispose()


def pg_env(database: str) -> dict[str, str]:
    """The profile's DAGSTER_PG_* variables for a database on the local server (trust auth: no password)."""
    return {
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": "5432",
        "DAGSTER_PG_USER": "postgres",
        "DAGSTER_PG_PASSWORD": "",
        "DAGSTER_PG_DB": database,
    }


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh, empty database on the local server (its name), dropped afterwards with whatever still uses it."""
    with admin_connection() as conn:
        name = f"rivya_scale_{uuid.uuid4().hex[:12]}"
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield name
        finally:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_home(tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DAGSTER_HOME with the production profile, unchanged; this process's DAGSTER_PG_* name the test database."""
    home = tmp_path / "postgres_home"
    home.mkdir()
    shutil.copy(PROFILE, home / "dagster.yaml")
    for name, value in pg_env(pg_database).items():
        monkeypatch.setenv(name, value)
    return home


@pytest.fixture
def postgres_instance(postgres_home: Path) -> Iterator[DagsterInstance]:
    with DagsterInstance.from_config(str(postgres_home)) as instance:
        yield instance
