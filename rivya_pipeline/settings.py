"""Every non-secret setting, read from the environment in one place, and the defaults the whole package shares.

The API key is deliberately NOT here: it only ever reaches the code through a Dagster `EnvVar`, so
it is never part of run config, definitions metadata or this object's repr. This module imports nothing from
the package but the QC thresholds' model (which imports nothing from it), so any module can take its constants
from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import overload

from pydantic import ValidationError

from .qc.thresholds import QcThresholds

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE_URL = "https://rivya.ai"
REQUESTS_PATH_ENV = "RIVYA_REQUESTS_PATH"  # the briefs folder
# Dagster advises at most 100,000 partitions per asset (the UI slows beyond); discovery warns at 80% of it.
DEFAULT_PARTITION_CEILING = 100_000


def utc_now() -> datetime:
    """The clock every recorded time is read from: timezone-aware UTC (the ledger refuses naive times)."""
    return datetime.now(UTC)


class SettingsError(ValueError):
    """A setting has a value that cannot work; names the variable and the rule."""


@overload
def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int: ...


@overload
def _int(env: Mapping[str, str], name: str, default: None, minimum: int = 0) -> int | None: ...


def _int(env: Mapping[str, str], name: str, default: int | None, minimum: int = 0) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}: must be a whole number (got {raw!r})") from None
    if value < minimum:
        raise SettingsError(f"{name}: must be >= {minimum} (got {value})")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: must be a number (got {raw!r})") from None
    if value <= 0:
        raise SettingsError(f"{name}: must be > 0 (got {value})")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}: must be 1/0, true/false, yes/no or on/off (got {raw!r})")


def qc_variable(threshold: str) -> str:
    """The variable of a QC threshold: `black_max_seconds` is RIVYA_QC_BLACK_MAX_SECONDS."""
    return f"RIVYA_QC_{threshold.upper()}"


def _qc_thresholds(env: Mapping[str, str]) -> dict[str, float]:
    """Every QC threshold from its variable, or its default; QcThresholds' own rules say which values can work."""
    values: dict[str, float] = {}
    for name in QcThresholds.model_fields:
        raw = env.get(qc_variable(name), "").strip()
        if raw:
            try:
                values[name] = float(raw)
            except ValueError:
                raise SettingsError(f"{qc_variable(name)}: must be a number (got {raw!r})") from None
    try:
        return QcThresholds(**values).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        raise SettingsError(f"{qc_variable(str(error['loc'][0]))}: {error['msg']} (got {error['input']})") from None


# Said by `run`, `dev` and the credit-limits resource's page in the UI when no daily cap is set.
UNBOUNDED_SPEND = (
    "No daily credit cap is set (RIVYA_MAX_CREDITS_PER_DAY): spend is unbounded. Every new brief in the folder is "
    "bought, and anyone who reaches the Dagster UI can launch paid runs."
)


@dataclass(frozen=True)
class Settings:
    """One field per variable. A resource field with the same name is filled from it (see `build_resources`)."""

    requests_path: Path
    base_url: str
    s3_bucket: str
    s3_prefix: str
    s3_endpoint_url: str | None
    s3_region: str | None
    s3_checksum_when_required: bool
    s3_chunk_mb: int
    max_credits_per_run: int | None
    max_credits_per_day: int | None
    min_wallet_credits: int
    ledger_url: str | None
    allow_local_media: bool
    max_media_mb: int
    task_deadline_minutes: int
    discovery_cron: str
    poll_requests_per_second: float
    poll_concurrency: int
    request_timeout_seconds: float
    store_retry_first_seconds: float
    store_retry_max_seconds: float
    store_window_hours: float
    relaunch_first_seconds: float
    partition_ceiling: int
    # The QC checks' thresholds, named as in QcThresholds (see there for their meaning and defaults).
    black_pixel_luma: float
    black_picture_share: float
    black_max_seconds: float
    black_max_fraction: float
    freeze_noise_db: float
    freeze_max_seconds: float
    silence_max_dbfs: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        requests_path = Path(env.get(REQUESTS_PATH_ENV) or REPO_ROOT / "requests")
        return cls(
            requests_path=requests_path.resolve(),
            base_url=env.get("RIVYA_BASE_URL") or DEFAULT_BASE_URL,
            s3_bucket=env.get("RIVYA_S3_BUCKET") or "rivya-videos",
            s3_prefix=env.get("RIVYA_S3_PREFIX") or "videos",
            s3_endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            s3_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            s3_checksum_when_required=_flag(env, "RIVYA_S3_CHECKSUM_WHEN_REQUIRED"),
            s3_chunk_mb=_int(env, "RIVYA_S3_CHUNK_MB", 8, minimum=5),
            max_credits_per_run=_int(env, "RIVYA_MAX_CREDITS_PER_RUN", None),
            max_credits_per_day=_int(env, "RIVYA_MAX_CREDITS_PER_DAY", None),
            min_wallet_credits=_int(env, "RIVYA_MIN_WALLET_CREDITS", 0),
            ledger_url=env.get("RIVYA_LEDGER_URL") or None,
            allow_local_media=_flag(env, "RIVYA_ALLOW_LOCAL_MEDIA"),
            max_media_mb=_int(env, "RIVYA_MAX_MEDIA_MB", 2048, minimum=1),
            task_deadline_minutes=_int(env, "RIVYA_TASK_DEADLINE_MINUTES", 30, minimum=1),
            discovery_cron=env.get("RIVYA_DISCOVERY_CRON") or "@hourly",
            poll_requests_per_second=_float(env, "RIVYA_POLL_REQUESTS_PER_SECOND", 20.0),
            poll_concurrency=_int(env, "RIVYA_POLL_CONCURRENCY", 16, minimum=1),
            request_timeout_seconds=_float(env, "RIVYA_TIMEOUT_SECONDS", 30.0),
            store_retry_first_seconds=_float(env, "RIVYA_STORE_RETRY_FIRST_SECONDS", 60.0),
            store_retry_max_seconds=_float(env, "RIVYA_STORE_RETRY_MAX_SECONDS", 1800.0),
            store_window_hours=_float(env, "RIVYA_STORE_WINDOW_HOURS", 24.0),
            relaunch_first_seconds=_float(env, "RIVYA_RELAUNCH_FIRST_SECONDS", 60.0),
            partition_ceiling=_int(env, "RIVYA_PARTITION_CEILING", DEFAULT_PARTITION_CEILING, minimum=1),
            **_qc_thresholds(env),
        )
