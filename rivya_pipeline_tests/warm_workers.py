"""The warm-worker profile (deploy/celery/dagster.yaml) as the tests run it: the daemon and Celery workers on this
machine's RabbitMQ and PostgreSQL, a queue of the test's own, briefs in a folder, and what to wait for and read
back (test_celery_workers.py, test_service_outages.py)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dagster import AssetKey, DagsterInstance
from kombu.connection import Connection

from rivya_pipeline.settings import Settings
from rivya_pipeline.workers import CELERY_PROFILE, CeleryTarget, ServiceProcesses, daemon_command, profile_with
from rivya_pipeline_tests.fixtures_emulator import TEST_API_KEY
from rivya_pipeline_tests.fixtures_postgres import pg_env
from rivya_pipeline_tests.helpers import s3_keys
from rivya_pipeline_tests.pipeline_process import settings_env

BROKER = "pyamqp://guest@127.0.0.1:5672//"
EVERY_MINUTE = "* * * * *"
# Generous: the first discovery tick alone is up to a minute away, and the machine is shared.
DEADLINE_SECONDS = 300.0
POLL_SECONDS = 0.5
STORED_VIDEO = AssetKey("stored_video")
CLI = Path(sys.executable).with_name("rivya-pipeline")
T = TypeVar("T")


def broker_queue_name() -> str:
    """A queue of this test's own: other stacks may share the broker, and must never take its runs."""
    return f"rivya-test-{uuid.uuid4().hex[:12]}"


def skip_without_broker(broker: str = BROKER) -> None:
    try:
        with Connection(broker, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    except OSError as exc:
        pytest.skip(f"RabbitMQ at 127.0.0.1:5672 is unreachable: {exc}")


def write_celery_home(home: Path, queue: str, overrides: Mapping[str, Any]) -> Path:
    """DAGSTER_HOME with the profile; only the queue and `overrides` (shorter intervals) differ."""
    home.mkdir()
    overrides = dict(overrides) | {"run_launcher": {"config": {"default_queue": queue}}}
    (home / "dagster.yaml").write_text(profile_with(CELERY_PROFILE, overrides), encoding="utf-8")
    return home


def write_briefs(folder: Path, brief_ids: list[str]) -> Path:
    """Text-only briefs, one file each, in a folder of their own."""
    folder.mkdir()
    for index, brief_id in enumerate(brief_ids):
        (folder / f"{brief_id}.yaml").write_text(
            f"id: {brief_id}\nprompt: Take {index} of a paper kite over a windy beach at dawn.\n"
            "params: {duration: 5, aspect_ratio: '16:9'}\n",
            encoding="utf-8",
        )
    return folder


def warm_settings(pipeline_settings: Settings, folder: Path, brief_ids: list[str], **changes: Any) -> Settings:
    """The briefs in a folder of their own; discovery every minute; the ledger follows the instance."""
    return dataclasses.replace(
        pipeline_settings,
        requests_path=write_briefs(folder, brief_ids),
        ledger_url=None,
        discovery_cron=EVERY_MINUTE,
        **changes,
    )


def deployment_variables(home: Path, database: str, target: CeleryTarget, pg_port: int | None = None) -> dict[str, str]:
    """What every machine of the deployment sets: the instance's home, its PostgreSQL database (on `pg_port`
    instead of the server's own port when given: a proxy), the broker and the result backend."""
    env = pg_env(database) | {
        "DAGSTER_HOME": str(home),
        "DAGSTER_CELERY_BROKER_URL": target.broker,
        "DAGSTER_CELERY_BACKEND_URL": target.backend,
    }
    return env | ({"DAGSTER_PG_PORT": str(pg_port)} if pg_port else {})


def start_warm_services(processes: ServiceProcesses, workers: int, concurrency: int = 1) -> ServiceProcesses:
    """The daemon, and `rivya-pipeline workers` with `workers` workers of `concurrency` pool processes each."""
    processes.start("daemon", daemon_command())
    processes.start("workers", [str(CLI), "workers", "--count", str(workers), "--concurrency", str(concurrency)])
    return processes


def services_env(settings: Settings, deployment_env: Mapping[str, str]) -> dict[str, str]:
    """The environment of the daemon and the workers: configured as a deployment is, through variables only."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("RIVYA_", "DAGSTER_"))}
    return inherited | settings_env(settings) | dict(deployment_env) | {"RIVYA_API_KEY": TEST_API_KEY}


def wait_for(
    condition: Callable[[], T | None],
    what: str,
    services: ServiceProcesses,
    deadline_seconds: float = DEADLINE_SECONDS,
) -> T:
    """Polls until `condition()` gives something; fails at once if a service died, and after the deadline."""
    give_up = time.monotonic() + deadline_seconds
    while True:
        value = condition()
        if value:
            return value
        if services.exited():
            raise AssertionError(f"a service exited while waiting for {what}: {services.exited()}; {services.log_dir}")
        if time.monotonic() > give_up:
            raise AssertionError(f"gave up waiting for {what} after {deadline_seconds:.0f} s; {services.log_dir}")
        time.sleep(POLL_SECONDS)


def stored_briefs(instance: DagsterInstance) -> set[str]:
    return set(instance.get_materialized_partitions(STORED_VIDEO))


def s3_videos(s3_bucket: tuple[Any, str], prefix: str) -> dict[str, list[str]]:
    """brief id -> the keys of its video objects (.mp4) under the prefix."""
    videos: dict[str, list[str]] = {}
    for key in s3_keys(s3_bucket, f"{prefix}/"):
        if key.endswith(".mp4"):
            videos.setdefault(key.split("/")[-2], []).append(key)
    return videos
