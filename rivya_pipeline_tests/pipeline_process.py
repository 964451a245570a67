"""Runs of the real definitions in other OS processes, configured only through the environment, as a Dagster
run worker is: race tests start several at the same moment, crash tests kill -9 them half-way.

`python -m rivya_pipeline_tests.pipeline_process --select A,B --partition ID [--ready F --go G]` materializes the
selection for one brief on the instance at DAGSTER_HOME and prints one JSON line: success, run id, failure text.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from dagster import DagsterInstance, Definitions, materialize
from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository

from rivya_pipeline.definitions import ASSETS, build_definitions, build_resources
from rivya_pipeline.headless import QUIET_LOGS, failure_text
from rivya_pipeline.settings import REPO_ROOT, Settings

# Settings field -> the variable Settings.from_env() reads it from.
ENV_BY_SETTING = {
    "requests_path": "RIVYA_REQUESTS_PATH",
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
}
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
GO_POLL_SECONDS = 0.002


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


def start_materialize(
    env: dict[str, str],
    selection: list[str],
    brief_id: str,
    *,
    tags: dict[str, str] | None = None,
    ready: Path | None = None,
    go: Path | None = None,
) -> subprocess.Popen[str]:
    """Start one run process; with `ready`/`go` it touches `ready` once loaded, then waits for `go` to exist."""
    command = [sys.executable, "-m", __name__, "--select", ",".join(selection), "--partition", brief_id]
    command += [f"--tag={key}={value}" for key, value in (tags or {}).items()]
    if ready is not None and go is not None:
        command += ["--ready", str(ready), "--go", str(go)]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def outcome(process: subprocess.Popen[str], timeout: float) -> dict:
    """The JSON line a run process printed (it fails the test with the process's stderr when there is none)."""
    stdout, stderr = process.communicate(timeout=timeout)
    lines = stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        raise AssertionError(f"run process exited {process.returncode}:\n{stderr[-4000:]}")
    return json.loads(lines[-1])


def pipeline_definitions() -> Definitions:
    """The real definitions, built from the environment: a code location that run workers can load again."""
    return build_definitions(Settings.from_env())


def implicit_asset_job() -> ReconstructableJob:
    """The job the daemon launches the discovery schedule's runs in (the implicit asset job of the real
    definitions), loadable by pointer as a re-execution needs it."""
    location = ReconstructableRepository.for_module(__name__, pipeline_definitions.__name__, str(REPO_ROOT))
    return location.get_reconstructable_job(IMPLICIT_ASSET_JOB_NAME)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--select", required=True, help="comma-separated asset names")
    parser.add_argument("--partition", required=True)
    parser.add_argument("--tag", action="append", default=[], help="KEY=VALUE run tag (repeatable)")
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--go", type=Path)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    with DagsterInstance.get() as instance:
        if args.ready is not None:
            args.ready.touch()
            while not args.go.exists():
                time.sleep(GO_POLL_SECONDS)
        result = materialize(
            ASSETS,
            selection=args.select.split(","),
            partition_key=args.partition,
            instance=instance,
            resources=build_resources(settings),
            tags=dict(tag.split("=", 1) for tag in args.tag),
            run_config=QUIET_LOGS,
            raise_on_error=False,
        )
    failure = None if result.success else failure_text(result)
    print(json.dumps({"success": result.success, "run_id": result.run_id, "failure": failure}), flush=True)


if __name__ == "__main__":
    main()
