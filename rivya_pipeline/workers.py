"""Warm workers: Dagster runs executed as Celery tasks by long-lived processes (deploy/celery/).

The instance's `CeleryRunLauncher` sends each run to a broker queue; a worker started here takes it and executes
the whole run in one of its pool processes, which imported Dagster and the definitions once, before they were
forked. The workers read the broker, the result backend and the queue from that same launcher, so the side that
sends runs and the side that executes them cannot disagree.

`rivya-pipeline workers` starts them in the foreground; the scale benchmark and the tests start them (and the
Dagster daemon) through `ServiceProcesses`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil
import yaml
from dagster import DagsterInstance

from .settings import REPO_ROOT

CELERY_PROFILE = REPO_ROOT / "deploy" / "celery" / "dagster.yaml"
WORKER_APP = "rivya_pipeline.celery_app"  # Dagster's own Celery app, acknowledging runs when they end
# Imported by each worker before it forks its pool: every pool process starts with Dagster and the code loaded.
WARM_MODULE = "rivya_pipeline.definitions"
STOP_GRACE_SECONDS = 10.0


class WorkerSetupError(RuntimeError):
    """The instance cannot send runs to workers; says what to change."""


@dataclass(frozen=True)
class CeleryTarget:
    """Where the instance's run launcher sends runs: what every worker must listen to."""

    broker: str
    backend: str
    queue: str

    def worker_env(self) -> dict[str, str]:
        """Celery reads these before any config, so the URLs (and their passwords) never appear on a command line."""
        return {"CELERY_BROKER_URL": self.broker, "CELERY_RESULT_BACKEND": self.backend}


def celery_target(instance: DagsterInstance) -> CeleryTarget:
    from dagster_celery.launcher import CeleryRunLauncher

    launcher = instance.run_launcher
    if not isinstance(launcher, CeleryRunLauncher):
        raise WorkerSetupError(
            f"the instance at {instance.root_directory} launches runs with {type(launcher).__name__}, so no run "
            f"would reach a worker: copy {CELERY_PROFILE.relative_to(REPO_ROOT)} to its dagster.yaml "
            "(deploy/celery/README.md)"
        )
    if not launcher.broker or not launcher.backend:
        raise WorkerSetupError("the instance's CeleryRunLauncher names no broker or no result backend")
    return CeleryTarget(broker=launcher.broker, backend=launcher.backend, queue=launcher.default_queue)


def worker_command(name: str, queue: str, concurrency: int) -> list[str]:
    """One Celery worker of Dagster's app on `queue`, running `concurrency` runs at once (one per pool process)."""
    return [
        str(Path(sys.executable).with_name("celery")),
        "-A",
        WORKER_APP,
        "worker",
        "--queues",
        queue,
        "--concurrency",
        str(concurrency),
        # A run can take minutes: a pool process takes the next run only when it is free, never holds one back.
        "--prefetch-multiplier",
        "1",
        "--include",
        WARM_MODULE,
        "--hostname",
        f"{name}@%h",
        "--loglevel",
        "WARNING",
    ]


def daemon_command() -> list[str]:
    """The Dagster daemon on the project's workspace: schedule, sensor, run queue, monitoring, run retries."""
    return [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(REPO_ROOT / "workspace.yaml")]


class ServiceProcesses:
    """Long-lived processes, each the leader of its own process group: stopping them also stops what they started
    (a worker's pool processes, the daemon's code server and run processes, the workers of `rivya-pipeline
    workers`, which lead groups of their own), even after a failed test."""

    def __init__(self, env: Mapping[str, str], log_dir: Path | None = None) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        output: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = (self.log_dir / f"{name}.log").open("wb")
            self._logs.append(output)
        process = subprocess.Popen(
            command,
            env=self.env,
            cwd=REPO_ROOT,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start_workers(self, target: CeleryTarget, count: int, concurrency: int) -> None:
        self.env |= target.worker_env()
        for index in range(1, count + 1):
            # Named after the queue: two stacks on one host and broker (a test beside a benchmark) never clash.
            self.start(f"worker{index}", worker_command(f"{target.queue}-{index}", target.queue, concurrency))

    def exited(self) -> dict[str, int]:
        """The processes that have ended, with their exit codes."""
        return {name: code for name, process in self.processes.items() if (code := process.poll()) is not None}

    def stop(self, grace_seconds: float | None = STOP_GRACE_SECONDS) -> None:
        """SIGTERM to each leader (a Celery worker then finishes the runs it is executing; the daemon stops its
        threads), then SIGKILL to everything still alive after `grace_seconds` (None: wait as long as it takes)."""
        started = self.descendants()  # before any of them exits: an orphan no longer shows whose it was
        for process in self.processes.values():
            _signal_group(process, signal.SIGTERM, leader_only=True)
        deadline = None if grace_seconds is None else time.monotonic() + grace_seconds
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        self.kill(started)

    def descendants(self) -> list[psutil.Process]:
        found = []
        for process in self.processes.values():
            with contextlib.suppress(psutil.Error):
                found += psutil.Process(process.pid).children(recursive=True)
        return found

    def kill(self, descendants: list[psutil.Process] | None = None) -> None:
        """SIGKILL to every group and every descendant (by default, those alive now)."""
        descendants = self.descendants() if descendants is None else descendants
        for process in self.processes.values():
            _signal_group(process, signal.SIGKILL)
        for descendant in descendants:
            with contextlib.suppress(psutil.Error):
                descendant.kill()  # psutil refuses a pid that was reused by another process since
        for process in self.processes.values():
            process.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> ServiceProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals, leader_only: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if leader_only:
            if process.poll() is None:
                process.send_signal(sig)
        else:
            os.killpg(process.pid, sig)  # the group outlives its leader: a killed worker's pool processes


def profile_with(profile: Path, overrides: Mapping[str, Any]) -> str:
    """The YAML of an instance profile with some values replaced, nested keys merged (a test's shorter intervals,
    a queue of its own on a shared broker)."""

    def merged(base: Any, changes: Mapping[str, Any]) -> dict[str, Any]:
        result = dict(base)
        for key, value in changes.items():
            result[key] = merged(base.get(key, {}), value) if isinstance(value, Mapping) else value
        return result

    return yaml.safe_dump(merged(yaml.safe_load(profile.read_text(encoding="utf-8")), overrides), sort_keys=False)


def delete_queue(target: CeleryTarget) -> None:
    """Remove a queue from the broker once its workers are gone (a test's or a benchmark's own queue)."""
    from kombu.connection import Connection

    with Connection(target.broker, connect_timeout=10) as connection:
        connection.default_channel.queue_delete(target.queue)


def run_workers(env: Mapping[str, str], count: int, concurrency: int) -> int:
    """`rivya-pipeline workers`: start the workers in the foreground until Ctrl-C (or SIGTERM), or one exits."""
    with DagsterInstance.get() as instance:
        target = celery_target(instance)
    services = ServiceProcesses(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        services.start_workers(target, count, concurrency)
        print(
            f"{count} worker(s) x {concurrency} run(s) on queue {target.queue!r} "
            f"(DAGSTER_HOME={env.get('DAGSTER_HOME')}); Ctrl-C stops them after their current runs.",
            file=sys.stderr,
        )
        while not services.exited():
            time.sleep(1.0)
        print(f"a worker exited: {services.exited()}; stopping the others", file=sys.stderr)
        services.stop()
        return 1
    except KeyboardInterrupt:
        print("stopping: each worker finishes the runs it is executing (Ctrl-C again kills them)", file=sys.stderr)
        try:
            services.stop(grace_seconds=None)
        except KeyboardInterrupt:
            services.kill()
        return 0
