"""`bench scale`: the production path, a Dagster daemon over N briefs, per run launcher, against the in-process path.

For each profile the daemon (schedule, sensor, run queue, run monitoring, run retries) runs on a fresh instance
with the briefs' discovery every minute; the briefs are written to the folder two seconds before a discovery tick,
so the cron interval is not what is measured. The clock runs from "briefs in the folder" to "every video stored"
(the instance's stored_video partitions). Profiles:

- `default`: the instance `rivya-pipeline dev` creates (SQLite; a new run process per run, DefaultRunLauncher);
- `celery`: deploy/celery/dagster.yaml on a fresh PostgreSQL database, runs executed by warm workers
  (`rivya-pipeline workers`) on this machine's RabbitMQ; measured when both answer.

In the same run: `rivya-pipeline run` on the same briefs (the in-process path) and the bare httpx + boto3 script
(bench.bare_e2e), the floor of any orchestration. The emulator generates each video in about 2 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import psutil
from dagster import AssetKey, DagsterInstance, RunsFilter
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from ..defs.resources import default_ledger_url
from ..defs.store_batch import STORE_VIDEOS_JOB
from ..instance_setup import DEFAULT_CONFIG
from ..ledger import Ledger
from ..workers import CELERY_PROFILE, CeleryTarget, ServiceProcesses, daemon_command, delete_queue, profile_with
from . import SCALE_PROFILES
from .common import BenchResult, Figure
from .e2e import run_bare_script, timed_command
from .stack import BenchStack

FULL_BRIEFS = 200
QUICK_BRIEFS = 10
GENERATION = {"queued_seconds": 0.5, "processing_seconds": 1.5}  # the embedded emulator's: about 2 s per video
WORKERS, WORKER_CONCURRENCY = 2, 2
POSTGRES_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"  # trust auth, as on CI
BROKER = "pyamqp://guest@127.0.0.1:5672//"
BRIEFS_BEFORE_TICK_SECONDS = 2.0
STARTUP_DEADLINE_SECONDS = 180.0
SAMPLE_SECONDS = 0.1
STORED_VIDEO = AssetKey("stored_video")
GOAL_SECONDS_PER_BRIEF = 1.0
GOAL_RATIO_TO_INPROCESS = 1.5


def write_briefs(folder: Path, count: int) -> None:
    """`count` text-only briefs, one file each (the usual layout of a briefs folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"scale-{index:04d}.yaml").write_text(
            f"id: scale-{index:04d}\nprompt: Take {index} of a paper kite over a windy beach at dawn.\n"
            "params: {duration: 5, aspect_ratio: '16:9'}\n",
            encoding="utf-8",
        )


class ProcessSampler(threading.Thread):
    """CPU time and process starts of process trees (the daemon's, each worker's), sampled every 0.1 s.

    A process is counted once it has been seen; its CPU is its own (not its children's) at its last sample, so
    a process that lives under 0.1 s may be missed and each one may lose up to 0.1 s of CPU.
    """

    def __init__(self, roots: list[int]) -> None:
        super().__init__(daemon=True)
        self._roots = roots
        self._cpu: dict[tuple[int, float], float] = {}
        self._done = threading.Event()
        self.baseline: dict[tuple[int, float], float] = {}

    def sample(self) -> None:
        for root in self._roots:
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(root)
                for process in [parent, *parent.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        times = process.cpu_times()
                        self._cpu[(process.pid, process.create_time())] = times.user + times.system

    def start_measuring(self) -> None:
        self.sample()
        self.baseline = dict(self._cpu)
        self.start()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self.sample()

    def finish(self) -> tuple[int, float]:
        """(processes started since `start_measuring`, CPU seconds spent since then by every process seen)."""
        self._done.set()
        self.join()
        self.sample()
        started = len(self._cpu.keys() - self.baseline.keys())
        cpu = sum(seconds - self.baseline.get(key, 0.0) for key, seconds in self._cpu.items())
        return started, round(cpu, 1)


@dataclass
class Deployment:
    """One profile ready to run: its DAGSTER_HOME, the environment of its processes, and its workers' queue."""

    home: Path
    env: dict[str, str]
    target: CeleryTarget | None = None


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local server (its name), dropped afterwards."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"rivya_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def celery_unavailable() -> str | None:
    """Why the celery profile cannot run on this machine (no PostgreSQL or no broker), or None."""
    from kombu.connection import Connection

    try:
        with create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 5}).connect():
            pass
    except OperationalError:
        return "no PostgreSQL at 127.0.0.1:5432"
    try:
        with Connection(BROKER, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    except OSError:
        return "no RabbitMQ at 127.0.0.1:5672"
    return None


@contextlib.contextmanager
def deployment(profile: str, root: Path, base_env: dict[str, str]) -> Iterator[Deployment]:
    home = root / f"home-{profile}"
    home.mkdir()
    if profile == "default":
        (home / "dagster.yaml").write_text(DEFAULT_CONFIG, encoding="utf-8")
        yield Deployment(home, base_env | {"DAGSTER_HOME": str(home)})
        return
    with postgres_database() as database:
        target = CeleryTarget(
            broker=BROKER,
            backend=f"db+postgresql+psycopg2://postgres@127.0.0.1:5432/{database}",
            queue=f"rivya-bench-{uuid.uuid4().hex[:12]}",  # a queue of its own on a broker others may share
        )
        overrides = {"run_launcher": {"config": {"default_queue": target.queue}}}
        (home / "dagster.yaml").write_text(profile_with(CELERY_PROFILE, overrides), encoding="utf-8")
        env = base_env | {
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": "5432",
            "DAGSTER_PG_USER": "postgres",
            "DAGSTER_PG_PASSWORD": "",
            "DAGSTER_PG_DB": database,
            "DAGSTER_CELERY_BROKER_URL": target.broker,
            "DAGSTER_CELERY_BACKEND_URL": target.backend,
        }
        try:
            yield Deployment(home, env, target)
        finally:
            delete_queue(target)


def wait_until(condition: Callable[[], bool], what: str, deadline: float, services: ServiceProcesses) -> None:
    while not condition():
        if services.exited():
            raise RuntimeError(f"a process of the benchmark exited while waiting for {what}: {services.exited()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        time.sleep(0.5)


def ready(instance: DagsterInstance) -> bool:
    """The daemon loaded the code (the sensor ticked) and its scheduler knows the discovery schedule."""
    states = instance.all_instigator_state()
    # compared by value: the instigator type enum is not exported by dagster's public API
    sensors = [state for state in states if state.instigator_type.value == "SENSOR"]
    schedules = [state for state in states if state.instigator_type.value == "SCHEDULE"]
    return bool(schedules) and any(
        instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1) for state in sensors
    )


def workers_ready(target: CeleryTarget, count: int) -> bool:
    from celery import Celery

    app = Celery(broker=target.broker)
    try:
        replies = app.control.ping(timeout=1.0)
    finally:
        app.close()
    names = {name for reply in replies for name in reply}
    return len({name for name in names if name.startswith(f"{target.queue}-")}) >= count


def start_deployment(deployed: Deployment, instance: DagsterInstance, services: ServiceProcesses) -> None:
    """The profile's daemon (named "daemon") and its workers, once the daemon ticks and the workers answer."""
    services.start("daemon", daemon_command())
    if deployed.target is not None:
        services.start_workers(deployed.target, WORKERS, WORKER_CONCURRENCY)
    startup = time.monotonic() + STARTUP_DEADLINE_SECONDS
    wait_until(lambda: ready(instance), "the daemon", startup, services)
    if (target := deployed.target) is not None:
        wait_until(lambda: workers_ready(target, WORKERS), "the workers", startup, services)


def sleep_until_before_next_tick() -> None:
    """Until BRIEFS_BEFORE_TICK_SECONDS before a minute starts (the next but one when the next is too close)."""
    now = datetime.now(UTC)
    remaining = 60 - now.second - now.microsecond / 1e6 - BRIEFS_BEFORE_TICK_SECONDS
    time.sleep(remaining if remaining > 1 else remaining + 60)


def measure_profile(
    stack: BenchStack, profile: str, briefs: Path, count: int, root: Path, deadline_seconds: float
) -> dict[str, Figure]:
    stack.configure(**GENERATION)  # a fresh account: tasks, idempotency keys and charges of this profile only
    folder = root / f"briefs-{profile}"
    folder.mkdir()
    env = stack.pipeline_env() | {"RIVYA_REQUESTS_PATH": str(folder), "RIVYA_DISCOVERY_CRON": "* * * * *"}
    with contextlib.ExitStack() as opened:
        deployed = opened.enter_context(deployment(profile, root, env))
        # This process opens the same instance, first: its storage is created before any other process uses it.
        opened.enter_context(mock.patch.dict(os.environ, deployed.env))
        instance = opened.enter_context(DagsterInstance.from_config(str(deployed.home)))
        services = opened.enter_context(ServiceProcesses(deployed.env, log_dir=root / f"logs-{profile}"))
        start_deployment(deployed, instance, services)
        sampler = ProcessSampler([process.pid for process in services.processes.values()])
        sleep_until_before_next_tick()
        sampler.start_measuring()
        started = time.perf_counter()
        for brief in briefs.iterdir():
            shutil.copy(brief, folder / brief.name)
        wait_until(
            lambda: len(instance.get_materialized_partitions(STORED_VIDEO)) >= count,
            f"{count} stored videos ({profile})",
            time.monotonic() + deadline_seconds,
            services,
        )
        seconds = time.perf_counter() - started
        processes_started, cpu_seconds = sampler.finish()
        runs = instance.get_runs_count()
        store_batches = instance.get_runs_count(RunsFilter(job_name=STORE_VIDEOS_JOB))
        stored = len(instance.get_materialized_partitions(STORED_VIDEO))
        ledger = Ledger(default_ledger_url(instance))
        try:
            records = [ledger.latest_for_brief(brief.stem) for brief in briefs.iterdir()]
        finally:
            ledger.close()
    charges = stack.stats()["charges"]
    return {
        "seconds": round(seconds, 1),
        "seconds_per_brief": round(seconds / count, 3),
        "runs": runs,
        "store_batch_runs": store_batches,
        "processes_started": processes_started,
        "cpu_seconds": cpu_seconds,
        "cpu_seconds_per_brief": round(cpu_seconds / count, 2),
        "stored": stored,
        "duplicate_charges": len(charges) - len({record.task_id for record in records if record and record.task_id}),
    }


def measure_inprocess(stack: BenchStack, briefs: Path, root: Path) -> float:
    """`rivya-pipeline run` on the same briefs, on a fresh SQLite instance: seconds."""
    stack.configure(**GENERATION)
    home = root / "home-inprocess"
    home.mkdir()
    (home / "dagster.yaml").write_text(DEFAULT_CONFIG, encoding="utf-8")
    command = [sys.executable, "-m", "rivya_pipeline.cli", "run", "--requests", str(briefs), "--json"]
    seconds, _ = timed_command(command, env=stack.pipeline_env() | {"DAGSTER_HOME": str(home)})
    return seconds


def run(stack: BenchStack, quick: bool, briefs: int | None = None, profile: str | None = None) -> BenchResult:
    count = briefs or (QUICK_BRIEFS if quick else FULL_BRIEFS)
    skipped: dict[str, str] = {}
    if profile in (None, "celery") and (reason := celery_unavailable()):
        skipped["celery"] = reason
    profiles = [name for name in ([profile] if profile else SCALE_PROFILES) if name not in skipped]
    if not profiles:
        raise RuntimeError(f"profile {profile} cannot run on this machine: {skipped.get(profile or '')}")
    deadline_seconds = 300.0 + 30.0 * count  # generous: today's default takes several seconds per brief
    with tempfile.TemporaryDirectory(prefix="rivya-bench-scale-") as tmp:
        root = Path(tmp)
        folder = root / "briefs"
        write_briefs(folder, count)
        by_profile = {name: measure_profile(stack, name, folder, count, root, deadline_seconds) for name in profiles}
        stack.empty_bucket()
        inprocess_seconds = measure_inprocess(stack, folder, root)
        stack.configure(**GENERATION)
        bare_seconds, bare_stored = run_bare_script(stack, folder, stack.pipeline_env())
    stack.empty_bucket()
    inprocess_per_brief = inprocess_seconds / count
    for figures in by_profile.values():
        figures["ratio_to_inprocess"] = round(float(figures["seconds_per_brief"]) / inprocess_per_brief, 2)
    best = min(by_profile, key=lambda name: by_profile[name]["seconds_per_brief"])
    best_figures = by_profile[best]
    stored_everywhere = all(figures["stored"] == count for figures in by_profile.values())
    duplicates = sum(int(figures["duplicate_charges"]) for figures in by_profile.values())
    skipped_note = "".join(f" (skipped {name}: {reason})" for name, reason in skipped.items())
    return BenchResult(
        name="scale",
        setup=f"{count} text-only briefs, about 2 s per generation, the daemon from briefs in the folder to every "
        f"video stored; profiles: {', '.join(profiles)}{skipped_note}; celery: {WORKERS} workers x "
        f"{WORKER_CONCURRENCY} runs",
        figures={
            "seconds_per_brief": best_figures["seconds_per_brief"],
            "best_profile": best,
            "ratio_to_inprocess": best_figures["ratio_to_inprocess"],
            "inprocess_seconds_per_brief": round(inprocess_per_brief, 3),
            "bare_seconds_per_brief": round(bare_seconds / count, 3),
            "bare_stored": bare_stored,
            "briefs": count,
            **by_profile,
        },
        goals=[
            (f"every brief stored once by every profile ({stored_everywhere})", stored_everywhere),
            (f"0 duplicate charges ({duplicates})", duplicates == 0),
            (
                f"<= {GOAL_SECONDS_PER_BRIEF} s per brief ({best}: {best_figures['seconds_per_brief']} s)",
                float(best_figures["seconds_per_brief"]) <= GOAL_SECONDS_PER_BRIEF,
            ),
            (
                f"<= {GOAL_RATIO_TO_INPROCESS}x the in-process path ({best_figures['ratio_to_inprocess']}x)",
                float(best_figures["ratio_to_inprocess"]) <= GOAL_RATIO_TO_INPROCESS,
            ),
        ],
        bounds="Dagster runs: a submit run per brief (paid submits are never batched) and a store_videos run per "
        "batch of stores, each writing its events to the instance; the default launcher starts a Python process "
        "that imports Dagster and the code per run, warm workers import them once",
    )
