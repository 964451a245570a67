"""Dagster resources: Rivya credentials, credit limits (with their ledger), S3 and the briefs folder.

The API key is a field filled by `EnvVar("RIVYA_API_KEY")`, so the UI and run config show the
variable's name, never its value.
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource, DagsterInstance, InitResourceContext
from dagster_postgres import PostgresRunStorage
from pydantic import PrivateAttr
from sqlalchemy.exc import DBAPIError

from ..briefs import Brief, load_brief_by_id
from ..ledger import CreditLimits, Ledger
from ..polling import TaskPoller
from ..rivya import RetryPolicy, RivyaClient
from ..rivya.media import MediaFetcher
from ..storage import VideoStore, shared_s3_client

# The pool of generation_task, the paid create: bounds creates in flight across all runs of an instance.
PAID_CREATE_POOL = "rivya_api"
# Polls are cheap to repeat on the next pass; do not let one stuck poll hold a sensor tick.
POLL_RETRY = RetryPolicy(max_attempts=2, max_elapsed_seconds=5.0)


class RivyaResource(ConfigurableResource):
    """Rivya Public API v1: key, base URL, timeouts, poll rate and the media download rules."""

    api_key: str
    base_url: str = "https://rivya.ai"
    timeout_seconds: float = 30.0
    poll_requests_per_second: float = 20.0
    poll_concurrency: int = 16
    allow_local_media: bool = False
    max_media_mb: int = 2048

    _client: RivyaClient | None = PrivateAttr(default=None)
    _poll_client: RivyaClient | None = PrivateAttr(default=None)

    def client(self) -> RivyaClient:
        if self._client is None:
            self._client = RivyaClient(self.api_key, self.base_url, timeout_seconds=self.timeout_seconds)
        return self._client

    def poller(self, ledger: Ledger) -> TaskPoller:
        if self._poll_client is None:
            # One pool shared by all poll threads, a connection each: a smaller pool makes them queue for sockets.
            self._poll_client = RivyaClient(
                self.api_key,
                self.base_url,
                timeout_seconds=self.timeout_seconds,
                retry=POLL_RETRY,
                max_connections=self.poll_concurrency,
            )
        return TaskPoller(
            self._poll_client,
            ledger,
            requests_per_second=self.poll_requests_per_second,
            concurrency=self.poll_concurrency,
        )

    def media_fetcher(self) -> MediaFetcher:
        """Result videos live on another host: fetched without the key, with scheme/address/size rules."""
        return MediaFetcher(
            allow_local=self.allow_local_media,
            max_bytes=self.max_media_mb * 1_000_000,
            timeout=self.timeout_seconds * 4,
        )

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        for client in (self._client, self._poll_client):
            if client is not None:
                client.close()


class CreditLimitsResource(ConfigurableResource):
    """Spend caps enforced before every paid submit, against a ledger shared by all run processes.

    "Per run" means one pipeline run: a CLI invocation or one tick of the discovery schedule
    (the `rivya/batch` tag), or a single Dagster run when launched by hand.
    """

    max_credits_per_run: int | None = None
    max_credits_per_day: int | None = None
    min_wallet_credits: int = 0
    ledger_url: str | None = None
    task_deadline_minutes: int = 30

    def limits(self) -> CreditLimits:
        return CreditLimits(
            max_credits_per_run=self.max_credits_per_run,
            max_credits_per_day=self.max_credits_per_day,
            min_wallet_credits=self.min_wallet_credits,
        )

    _ledger: Ledger | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        if context.instance is not None:
            ensure_pool_row(context.instance, PAID_CREATE_POOL)

    def ledger(self, instance: DagsterInstance) -> Ledger:
        """The ledger at `ledger_url`, or else beside the instance's own data (see `default_ledger_url`)."""
        if self._ledger is None:
            self._ledger = Ledger(self.ledger_url or default_ledger_url(instance))
        return self._ledger

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._ledger is not None:
            self._ledger.close()


def ensure_pool_row(instance: DagsterInstance, pool: str) -> None:
    """Create a pool's row (at the instance's default limit) before any step of the run claims a slot in it.

    Dagster creates it on the first claim, and on PostgreSQL two runs doing that at the same moment fail one of
    them with a unique violation (dagster-io/dagster#33552). Here, the loser of that race finds the row in place.
    """
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits or storage.get_pool_config().default_pool_limit is None:
        return  # no pools configured: Dagster creates no row either
    if pool in storage.get_concurrency_keys():
        return
    try:
        storage.initialize_concurrency_limit_to_default(pool)
    except DBAPIError:
        if pool not in storage.get_concurrency_keys():
            raise


def default_ledger_url(instance: DagsterInstance) -> str:
    """The instance's own PostgreSQL database when it has one, else a SQLite file in its home.

    A Postgres-backed instance is shared by processes on many machines (run pods, Celery workers), where a
    SQLite file in each DAGSTER_HOME would split one budget into many; its database holds the rivya_* tables too.
    """
    if isinstance(instance.run_storage, PostgresRunStorage):
        return instance.run_storage.postgres_url
    return Ledger.default_url(instance.root_directory)


class VideoStorageResource(ConfigurableResource):
    """Where finished videos go: an S3 bucket/prefix, or any S3-compatible store via endpoint_url."""

    bucket: str
    prefix: str = "videos"
    endpoint_url: str | None = None
    region: str | None = None
    checksum_when_required: bool = False
    chunk_mb: int = 8

    def store(self) -> VideoStore:
        client = shared_s3_client(self.endpoint_url, self.region, self.checksum_when_required)
        return VideoStore(
            client, self.bucket, self.prefix, chunk_bytes=self.chunk_mb * 1024**2, endpoint_url=self.endpoint_url
        )


class BriefsResource(ConfigurableResource):
    """The folder of YAML briefs (RIVYA_REQUESTS_PATH)."""

    path: str

    def folder(self) -> Path:
        return Path(self.path)

    def load(self, brief_id: str) -> Brief:
        return load_brief_by_id(self.folder(), brief_id)
