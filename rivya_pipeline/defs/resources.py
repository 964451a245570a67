"""Dagster resources: the Rivya credentials and polling, the credit limits, the ledger, S3 and the briefs folder.

The API key is a field filled by `EnvVar("RIVYA_API_KEY")`, so the UI and run config show the
variable's name, never its value. Every other field has the name of the setting it is built from
(`settings.Settings`, see `from_settings`), and a description the UI shows on the resource's page.
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from dagster import ConfigurableResource, DagsterInstance, InitResourceContext
from dagster_postgres import PostgresRunStorage
from pydantic import Field, PrivateAttr
from sqlalchemy.exc import DBAPIError

from ..briefs import Brief, load_brief_by_id
from ..ledger import BriefIndex, CreditLimits, Ledger, StoreRetryPolicy, TaskTracker
from ..polling import TaskPoller
from ..qc.thresholds import QcThresholds
from ..rivya import RetryPolicy, RivyaClient
from ..rivya.media import MediaFetcher
from ..settings import DEFAULT_BASE_URL, DEFAULT_PARTITION_CEILING, UNBOUNDED_SPEND, Settings
from ..storage import VideoStore, shared_s3_client

# The pool of generation_task, the paid create: bounds creates in flight across all runs of an instance.
PAID_CREATE_POOL = "rivya_api"
# Polls are cheap to repeat on the next pass; do not let one stuck poll hold a sensor tick.
POLL_RETRY = RetryPolicy(max_attempts=2, max_elapsed_seconds=5.0)
Resource = TypeVar("Resource", bound=ConfigurableResource)


def from_settings(resource: type[Resource], settings: Settings, **values: Any) -> Resource:
    """`resource` with every field that has a setting of the same name set from it, and `values` for the rest."""
    configured = {name: getattr(settings, name) for name in resource.model_fields if hasattr(settings, name)}
    return resource(**{name: str(v) if isinstance(v, Path) else v for name, v in configured.items()}, **values)


class RivyaResource(ConfigurableResource):
    """Rivya Public API v1: key, base URL, timeouts, how tasks are polled and the media download rules."""

    api_key: str = Field(description="Rivya API key (rvya_sk_...). Set it through the RIVYA_API_KEY variable.")
    base_url: str = Field(default=DEFAULT_BASE_URL, description="Origin of the Rivya API.")
    request_timeout_seconds: float = Field(
        default=30.0, description="Timeout of one API request; result downloads get four times as long."
    )
    poll_requests_per_second: float = Field(
        default=20.0, description="Status requests per second at most, shared by every poller of a process."
    )
    poll_concurrency: int = Field(default=16, description="Status requests in flight at once during a poll pass.")
    task_deadline_minutes: int = Field(
        default=30, description="A task not finished this long after its create is reported, no longer polled."
    )
    allow_local_media: bool = Field(
        default=False, description="Accept result URLs on local or private addresses (the local emulator only)."
    )
    max_media_mb: int = Field(default=2048, description="Largest result video downloaded, in MB.")

    _client: RivyaClient | None = PrivateAttr(default=None)
    _poll_client: RivyaClient | None = PrivateAttr(default=None)

    def client(self) -> RivyaClient:
        if self._client is None:
            self._client = RivyaClient(self.api_key, self.base_url, timeout_seconds=self.request_timeout_seconds)
        return self._client

    def task_deadline(self) -> timedelta:
        return timedelta(minutes=self.task_deadline_minutes)

    def poller(self, ledger: TaskTracker) -> TaskPoller:
        if self._poll_client is None:
            # The pattern of the poll threads' clients: each thread opens a connection of its own from it.
            self._poll_client = RivyaClient(
                self.api_key,
                self.base_url,
                timeout_seconds=self.request_timeout_seconds,
                retry=POLL_RETRY,
                max_connections=1,
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
            timeout=self.request_timeout_seconds * 4,
        )

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        for client in (self._client, self._poll_client):
            if client is not None:
                client.close()


class CreditLimitsResource(ConfigurableResource):
    """Spend caps checked before every paid submit, against the ledger shared by all run processes.

    "Per run" means one pipeline run: a CLI invocation or one tick of the discovery schedule
    (the `rivya/batch` tag), or a single Dagster run when launched by hand.
    """

    max_credits_per_run: int | None = Field(
        default=None, description="Credits one pipeline run may reserve; empty for no cap."
    )
    max_credits_per_day: int | None = Field(
        default=None, description="Credits all runs together may reserve in any 24 hours; empty for no cap."
    )
    min_wallet_credits: int = Field(
        default=0, description="Credits that must remain in the Rivya wallet after a submit; 0 for no floor."
    )

    def model_post_init(self, context: Any) -> None:
        """The resource's page in the UI shows its description: without a daily cap it says that spend is unbounded
        (Dagster reads the description from the instance's __doc__)."""
        super().model_post_init(context)
        if self.max_credits_per_day is None:
            object.__setattr__(self, "__doc__", f"{UNBOUNDED_SPEND}\n\n{inspect.cleandoc(type(self).__doc__ or '')}")

    def limits(self) -> CreditLimits:
        return CreditLimits(
            max_credits_per_run=self.max_credits_per_run,
            max_credits_per_day=self.max_credits_per_day,
            min_wallet_credits=self.min_wallet_credits,
        )


class LedgerResource(ConfigurableResource):
    """The spend ledger, one per instance: every run process and the sensor share it."""

    ledger_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the ledger; empty: the instance's PostgreSQL database, or a SQLite file "
        "in DAGSTER_HOME.",
    )

    _ledger: Ledger | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        if context.instance is not None:
            ensure_pool_row(context.instance, PAID_CREATE_POOL)

    def for_instance(self, instance: DagsterInstance) -> Ledger:
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
    """Where finished videos go: an S3 bucket/prefix, or any S3-compatible store via its endpoint URL."""

    s3_bucket: str = Field(description="Bucket of the videos and their sidecars.")
    s3_prefix: str = Field(default="videos", description="Key prefix: videos land at {prefix}/{brief}/{task}.mp4.")
    s3_endpoint_url: str | None = Field(
        default=None, description="Endpoint of an S3-compatible store (MinIO, R2, Ceph); empty for AWS S3."
    )
    s3_region: str | None = Field(default=None, description="Region of the bucket; empty for boto3's default.")
    s3_checksum_when_required: bool = Field(
        default=False, description="Send checksums only when S3 requires them (stores that reject the new headers)."
    )
    s3_chunk_mb: int = Field(default=8, description="Multipart part size in MiB (at least 5).")
    store_retry_first_seconds: float = Field(
        default=60.0, description="Wait after a failed store before the next attempt; it doubles after each failure."
    )
    store_retry_max_seconds: float = Field(default=1800.0, description="Longest wait between two store attempts.")
    store_window_hours: float = Field(
        default=24.0,
        description="How long after a task's success its video is still tried (Rivya does not document how long "
        "result URLs live). Past it the video is reported as not stored, with what to do.",
    )

    def retry_policy(self) -> StoreRetryPolicy:
        return StoreRetryPolicy(
            first_wait=timedelta(seconds=self.store_retry_first_seconds),
            max_wait=timedelta(seconds=self.store_retry_max_seconds),
            window=timedelta(hours=self.store_window_hours),
        )

    def store(self) -> VideoStore:
        client = shared_s3_client(self.s3_endpoint_url, self.s3_region, self.s3_checksum_when_required)
        return VideoStore(
            client,
            self.s3_bucket,
            self.s3_prefix,
            chunk_bytes=self.s3_chunk_mb * 1024**2,
            endpoint_url=self.s3_endpoint_url,
        )


class VideoQcResource(ConfigurableResource, QcThresholds):
    """The thresholds of stored_video's QC checks: every field of QcThresholds (its descriptions show in the UI),
    each set from its variable RIVYA_QC_<FIELD NAME>. The checks name the values they used in their metadata."""

    def thresholds(self) -> QcThresholds:
        return QcThresholds(**{name: getattr(self, name) for name in QcThresholds.model_fields})


class BriefsResource(ConfigurableResource):
    """The folder of YAML briefs (RIVYA_REQUESTS_PATH)."""

    requests_path: str = Field(description="Folder of the YAML briefs, searched with its subfolders.")
    relaunch_first_seconds: float = Field(
        default=60.0,
        description="Wait after every run of a brief version failed before its create was sent (a dead worker, a "
        "lost broker) before discovery launches it again; doubles after each relaunch, three relaunches at most.",
    )
    partition_ceiling: int = Field(
        default=DEFAULT_PARTITION_CEILING,
        description="The most `briefs` partitions the deployment plans for (Dagster advises at most 100,000 per "
        "asset); discovery warns in its tick once 80% of it is reached.",
    )

    def folder(self) -> Path:
        return Path(self.requests_path)

    def load(self, brief_id: str, index: BriefIndex | None = None) -> Brief:
        """The brief, read from the file `index` last saw it in when that file still holds it, else from the folder."""
        folder = self.folder()
        return load_brief_by_id(folder, brief_id, source=index.brief_file(folder, brief_id) if index else None)
