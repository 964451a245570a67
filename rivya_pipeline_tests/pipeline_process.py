"""Runs of the real definitions in other OS processes, configured only through their environment as a Dagster run
worker is: race tests start several at the same moment, crash tests kill -9 them half-way.

The processes come from a fork server that has imported the pipeline once (Dagster's multiprocess executor starts
its step processes the same way), so eight of them cost eight runs, not eight imports of Dagster. Each one still
opens its own Dagster instance, ledger, HTTP and S3 connections.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, Definitions, ExecuteInProcessResult
from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository

from rivya_pipeline.definitions import build_definitions, build_resources
from rivya_pipeline.headless import QUIET_LOGS, failure_text, materialize_brief
from rivya_pipeline.settings import REPO_ROOT, REQUESTS_PATH_ENV, Settings

# Settings field -> the variable Settings.from_env() reads it from.
ENV_BY_SETTING = {
    "requests_path": REQUESTS_PATH_ENV,
    "base_url": "RIVYA_BASE_URL",
    "s3_bucket": "RIVYA_S3_BUCKET",
    "s3_prefix": "RIVYA_S3_PREFIX",
    "s3_endpoint_url": "AWS_ENDPOINT_URL_S3",
    "s3_region": "AWS_REGION",
    "s3_checksum_when_required": "RIVYA_S3_CHECKSUM_WHEN_REQUIRED",
    "s3_chunk_mb": "RIVYA_S3_CHUNK_MB",
    "max_credits_per_run": "RIVYA_MAX_CREDITS_PER_RUN",
    "max_credits_per_day": "RIVYA_MAX_CREDITS_PER_DAY",
    "min_wallet_credits": "RIVYA_MIN_WALLET_CREDITS",
    "ledger_url": "RIVYA_LEDGER_URL",
    "allow_local_media": "RIVYA_ALLOW_LOCAL_MEDIA",
    "max_media_mb": "RIVYA_MAX_MEDIA_MB",
    "task_deadline_minutes": "RIVYA_TASK_DEADLINE_MINUTES",
    "discovery_cron": "RIVYA_DISCOVERY_CRON",
    "poll_requests_per_second": "RIVYA_POLL_REQUESTS_PER_SECOND",
    "poll_concurrency": "RIVYA_POLL_CONCURRENCY",
    "request_timeout_seconds": "RIVYA_TIMEOUT_SECONDS",
    "store_retry_first_seconds": "RIVYA_STORE_RETRY_FIRST_SECONDS",
    "store_retry_max_seconds": "RIVYA_STORE_RETRY_MAX_SECONDS",
    "store_window_hours": "RIVYA_STORE_WINDOW_HOURS",
    "relaunch_first_seconds": "RIVYA_RELAUNCH_FIRST_SECONDS",
}
BARRIER_TIMEOUT_SECONDS = 120

FORK_SERVER = multiprocessing.get_context("forkserver")
FORK_SERVER.set_forkserver_preload([__name__])


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment in which Settings.from_env() gives back `settings`; checked, so a new field fails loudly."""

    def text(value: object) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "1" if value else "0"
        return str(value)

    env = {variable: text(getattr(settings, name)) for name, variable in ENV_BY_SETTING.items()}
    if Settings.from_env(env) != settings:
        raise AssertionError(f"ENV_BY_SETTING misses a setting: {Settings.from_env(env)} != {settings}")
    return env


@dataclass
class RunProcess:
    """One run process; its outcome (success, run id, failure text) arrives as a JSON file when it ends."""

    process: BaseProcess
    outcome_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> bool:
        return not self.process.is_alive()

    def outcome(self, timeout: float) -> dict:
        self.process.join(timeout)
        if self.process.exitcode != 0 or not self.outcome_file.exists():
            raise AssertionError(f"run process ended with exit code {self.process.exitcode} (its stderr is above)")
        return json.loads(self.outcome_file.read_text())

    def kill_9(self, timeout: float) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.process.join(timeout)
        if self.process.exitcode != -signal.SIGKILL:
            raise AssertionError(f"run process was not killed by SIGKILL (exit code {self.process.exitcode})")


def start_materialize(
    env: dict[str, str],
    selection: list[str],
    brief_id: str,
    outcome_file: Path,
    *,
    tags: dict[str, str] | None = None,
    barrier: Barrier | None = None,
) -> RunProcess:
    """Start a process that materializes `selection` for one brief; with a barrier, all parties start together."""
    process = FORK_SERVER.Process(
        target=materialize_here,
        args=(env, selection, brief_id, outcome_file, tags or {}, barrier),
        daemon=True,
    )
    process.start()
    return RunProcess(process, outcome_file)


def new_barrier(parties: int) -> Barrier:
    return FORK_SERVER.Barrier(parties)


def materialize_here(
    env: dict[str, str],
    selection: list[str],
    brief_id: str,
    outcome_file: Path,
    tags: dict[str, str],
    barrier: Barrier | None,
) -> None:
    """The body of a run process: the environment is all it is given, as for a run worker."""
    os.environ.clear()
    os.environ.update(env)
    settings = Settings.from_env()
    with DagsterInstance.get() as instance:
        if barrier is not None:
            barrier.wait(BARRIER_TIMEOUT_SECONDS)
        result = materialize_brief(
            selection, brief_id, instance=instance, resources=build_resources(settings), tags=tags, raise_on_error=False
        )
    _write_outcome(outcome_file, result)


def launch_here(
    env: dict[str, str], job_name: str, run_config: dict[str, Any], tags: dict[str, str], outcome_file: Path
) -> None:
    """A run of one of the definitions' jobs (a sensor's store_videos batch, say) as its run worker executes it."""
    os.environ.clear()
    os.environ.update(env)
    job = pipeline_definitions().resolve_job_def(job_name)
    with DagsterInstance.get() as instance:
        result = job.execute_in_process(
            run_config={**QUIET_LOGS, **run_config}, instance=instance, tags=tags, raise_on_error=False
        )
    _write_outcome(outcome_file, result)


def _write_outcome(outcome_file: Path, result: ExecuteInProcessResult) -> None:
    failure = None if result.success else failure_text(result)
    outcome_file.write_text(json.dumps({"success": result.success, "run_id": result.run_id, "failure": failure}))


def pipeline_definitions() -> Definitions:
    """The real definitions, built from the environment: a code location that run workers can load again."""
    return build_definitions(Settings.from_env())


def implicit_asset_job() -> ReconstructableJob:
    """The job the daemon launches the discovery schedule's runs in (the implicit asset job of the real
    definitions), loadable by pointer as a re-execution needs it."""
    location = ReconstructableRepository.for_module(__name__, pipeline_definitions.__name__, str(REPO_ROOT))
    return location.get_reconstructable_job(IMPLICIT_ASSET_JOB_NAME)
