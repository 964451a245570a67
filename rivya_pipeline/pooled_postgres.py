"""Dagster's PostgreSQL storage, keeping its connections between calls (`storage: custom:` in deploy/celery/).

Outside the webserver, dagster-postgres opens a new connection for every storage call (SQLAlchemy's NullPool), and
PostgreSQL forks a backend process for each: `bench scale` counted about 290 connections per brief on warm workers,
and those forks took about half of the machine's CPU. Here the run and event log storages get the webserver's own
remedy from the start (`optimize_for_webserver`: a pooled engine), in every process that opens the instance: the
daemon, each run on a worker, the webserver. The schedule storage stays unpooled: few calls use it, and Dagster
never disposes it, so a pooled one would keep a connection open after every run on a warm worker.

dagster-postgres's `dispose` leaves the engine alone (it expects NullPool); a pooled storage disposes its engine
(`_engine`, the attribute `optimize_for_webserver` sets) so that a warm worker holds no connection between runs.
`test_scaleout.py` counts the connections. With PgBouncer in front of PostgreSQL, plain `storage: postgres:` does
as well.
"""

from collections.abc import Mapping
from typing import Any

from dagster_postgres import DagsterPostgresStorage, PostgresEventLogStorage, PostgresRunStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

# dagster-webserver's defaults (--db-pool-recycle, --db-pool-max-overflow); no statement timeout, as without a pool.
POOL_RECYCLE_SECONDS = 3600
POOL_MAX_OVERFLOW = 20
NO_STATEMENT_TIMEOUT = 0


class _KeepsConnections:
    """For a dagster-postgres storage: a pooled engine from the start, disposed with the storage."""

    _engine: Any  # set by the storage, replaced by optimize_for_webserver

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the storage class this is mixed into has both methods
        self.optimize_for_webserver(  # pyright: ignore[reportAttributeAccessIssue]
            statement_timeout=NO_STATEMENT_TIMEOUT, pool_recycle=POOL_RECYCLE_SECONDS, max_overflow=POOL_MAX_OVERFLOW
        )

    def dispose(self) -> None:
        super().dispose()  # pyright: ignore[reportAttributeAccessIssue]
        self._engine.dispose()


class PooledPostgresRunStorage(_KeepsConnections, PostgresRunStorage):
    pass


class PooledPostgresEventLogStorage(_KeepsConnections, PostgresEventLogStorage):
    pass


class PooledPostgresStorage(DagsterPostgresStorage):
    """`storage: postgres:` (the same config), its run and event log storages on pooled engines."""

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, **kwargs: Any) -> None:
        super().__init__(postgres_url, should_autocreate_tables, **kwargs)
        token_provider = kwargs.get("token_provider")
        self._pooled_runs = PooledPostgresRunStorage(
            postgres_url, should_autocreate_tables, token_provider=token_provider
        )
        self._pooled_events = PooledPostgresEventLogStorage(
            postgres_url, should_autocreate_tables, token_provider=token_provider
        )

    @property
    def run_storage(self) -> PostgresRunStorage:
        return self._pooled_runs

    @property
    def event_log_storage(self) -> PostgresEventLogStorage:
        return self._pooled_events

    @classmethod
    def from_config_value(  # the parent builds its own class by name
        cls, inst_data: Any, config_value: Mapping[str, Any]
    ) -> "PooledPostgresStorage":
        return cls(
            pg_url_from_config(config_value),
            config_value.get("should_autocreate_tables", True),
            inst_data=inst_data,
            token_provider=get_token_provider_from_config(config_value),
        )
