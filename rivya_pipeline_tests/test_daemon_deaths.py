"""Deaths on the production path: the Dagster daemon killed with kill -9 five times over 30 briefs, on the default
profile and on the warm-worker profile. Failure mode: a daemon killed mid-tick must not lose or double-buy work.

Each kill is what a node drain does to the daemon's node: SIGKILL to the daemon's whole process group, that is the
daemon, the code server it started and, on the default profile, every run process the DefaultRunLauncher started
(they are children of the code server, in the same group; the test checks that none of them survives). On the
warm-worker profile the runs execute on the Celery workers, which are other machines in production and live on:
only the daemon's node is drained. After each kill the daemon is started again at once, as a supervisor would.

At a kill, a default-launcher run's process dies with the group (checked at every kill); the restarted daemon's run
monitoring asks the run's code server about it through the profile's launcher (rivya_pipeline/run_launchers.py),
finds that server gone, fails the run, and run retries start it again. On the warm-worker profile the runs go on in
the workers' pool processes, and the restarted daemon's queue, sensor and run monitoring take up where the dead one
stopped (worker deaths are test_celery_workers.py's).

The moments are random (seeded; the seed and every moment are printed, RIVYA_DEATHS_SEED replays them), drawn in
each phase of the batch's life: during the first discovery tick, while submits run, while stores run. Nothing but
the kills drives the pipeline: the discovery schedule (every minute) launches the submit runs, the sensor the
store runs, the run queue and run monitoring do the rest. Only intervals are shortened, in the instance's config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from dagster import AssetRecordsFilter, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from rivya_pipeline.defs.assets import BATCH_TAG
from rivya_pipeline.defs.resources import default_ledger_url
from rivya_pipeline.defs.sensors import UNFINISHED
from rivya_pipeline.emulator import RivyaEmulator
from rivya_pipeline.instance_setup import write_default_config
from rivya_pipeline.ledger import Ledger
from rivya_pipeline.rivya import RivyaClient
from rivya_pipeline.settings import Settings
from rivya_pipeline.workers import CeleryTarget, ServiceProcesses, daemon_command, delete_queue, profile_with
from rivya_pipeline_tests import warm_workers as warm
from rivya_pipeline_tests.fixtures_emulator import TEST_ACCOUNT, TEST_CREDITS
from rivya_pipeline_tests.fixtures_postgres import pg_env
from rivya_pipeline_tests.helpers import KLING_PRICE, metadata_values, s3_bytes

BRIEFS = [f"death-{index:02d}" for index in range(30)]
BRIEF_TEXT = (
    "id: {id}\nprompt: Take {index} of a paper lantern over a quiet harbour at dusk.\nparams: {{duration: 3}}\n"
)
WORKERS, WORKER_CONCURRENCY = 2, 2
EVERY_MINUTE = "* * * * *"
INSTANCE_OVERRIDES = {
    # A run whose launch the kill cut short (STARTING, never started) is failed, then retried, within the test's
    # deadline rather than after the profiles' 300 s; a dead STARTED run is found at the next 1 s pass, not 30 s.
    "run_monitoring": {"poll_interval_seconds": 1, "free_slots_after_run_end_seconds": 1, "start_timeout_seconds": 90},
}
SEED_ENV = "RIVYA_DEATHS_SEED"
MOMENT_SECONDS = 100.0  # how long a kill waits for its phase to begin before it kills anyway
STORED_DEADLINE_SECONDS = 300.0  # from the last kill to every brief stored
# No video stored, no run changing status, no create answered for this long: the batch is stuck, not slow. Longer
# than the start timeout: a run whose launch was cut short (or whose process takes a minute to start on a loaded
# machine) stays STARTING until monitoring fails it, and 75 s, shorter than that, once called such a batch stuck.
STALL_SECONDS = INSTANCE_OVERRIDES["run_monitoring"]["start_timeout_seconds"] + 45.0
SETTLE_SECONDS = 90.0  # from every brief stored to no run unfinished, and to a discovery tick after the last kill
MOMENT_POLL_SECONDS = 0.1
STORE_JOBS = {"store_videos", "store_video"}


@dataclass(frozen=True)
class Progress:
    """Where the batch is: what the kills are timed by, and what each kill prints."""

    discovery_ticks: int
    discovery: str  # the status of the latest discovery tick ("" before the first)
    runs: int  # runs created
    submits_started: int  # submit runs (discovery's, tagged rivya/batch) executing now
    stores_started: int  # store runs executing now
    answered: int  # ledger rows whose create Rivya answered
    stored: int  # briefs with a stored_video materialization


@dataclass(frozen=True)
class Moment:
    phase: str
    begun: Callable[[Progress], bool]
    max_delay_seconds: float  # the kill comes at a seeded random delay in [0, this) after the phase begins


MOMENTS = (
    Moment("discovery", lambda p: p.discovery_ticks > 0, 1.5),
    Moment("submits", lambda p: p.submits_started > 0, 4.0),
    Moment("submits", lambda p: p.answered >= len(BRIEFS) // 2, 4.0),
    Moment("stores", lambda p: p.stores_started > 0, 2.0),
    Moment("stores", lambda p: p.stored >= len(BRIEFS) // 3, 3.0),
)


@dataclass
class Deployment:
    home: Path
    env: dict[str, str]  # this process's DAGSTER_* variables too
    target: CeleryTarget | None = None


@contextmanager
def deployed(profile: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """default: the instance `rivya-pipeline dev` creates (SQLite, the monitored default launcher). celery:
    deploy/celery/dagster.yaml on a fresh PostgreSQL database and a queue of the test's own on this machine's
    RabbitMQ. Both with INSTANCE_OVERRIDES."""
    if profile == "default":
        home = tmp_path / "default_home"
        home.mkdir()
        write_default_config(home)
        config = home / "dagster.yaml"
        config.write_text(profile_with(config, INSTANCE_OVERRIDES), encoding="utf-8")
        yield Deployment(home, {"DAGSTER_HOME": str(home)})
        return
    database = request.getfixturevalue("pg_database")
    warm.skip_without_broker(warm.BROKER)
    backend = f"db+postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
    target = CeleryTarget(broker=warm.BROKER, backend=backend, queue=warm.broker_queue_name())
    home = warm.write_celery_home(tmp_path / "celery_home", target.queue, INSTANCE_OVERRIDES)
    celery_urls = {"DAGSTER_CELERY_BROKER_URL": target.broker, "DAGSTER_CELERY_BACKEND_URL": target.backend}
    try:
        yield Deployment(home, pg_env(database) | {"DAGSTER_HOME": str(home)} | celery_urls, target)
    finally:
        delete_queue(target)


def ticks_of(instance: DagsterInstance, kind: str) -> list[Any]:
    """Every tick of the instance's schedules ("SCHEDULE") or sensors ("SENSOR"), newest first."""
    states = [state for state in instance.all_instigator_state() if state.instigator_type.value == kind]
    ticks = [tick for s in states for tick in instance.get_ticks(s.instigator_origin_id, s.selector_id, limit=500)]
    return sorted(ticks, key=lambda tick: tick.timestamp, reverse=True)


def progress(instance: DagsterInstance, ledger: Ledger) -> Progress:
    started = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    by_status = ledger.count_by_status()
    discovery = ticks_of(instance, "SCHEDULE")
    return Progress(
        discovery_ticks=len(discovery),
        discovery=discovery[0].status.value if discovery else "",
        runs=instance.get_runs_count(),
        submits_started=sum(BATCH_TAG in run.tags for run in started),
        stores_started=sum(run.job_name in STORE_JOBS for run in started),
        answered=sum(by_status.values()) - by_status.get("submitting", 0),
        stored=len(warm.stored_briefs(instance)),
    )


@dataclass(frozen=True)
class Death:
    phase: str
    delay: float
    at: float  # seconds since the daemon first started
    wall: float  # time.time() of the kill
    progress: Progress
    runs_started: int  # runs STARTED at the kill
    run_processes: int  # of the daemon's descendants, the run processes (multiprocessing children of its code server)
    survivors: list[str]  # descendants still alive after the kill (their command lines)


def kill_daemon_group(
    services: ServiceProcesses, name: str, instance: DagsterInstance, ledger: Ledger, moment: Moment, delay: float
) -> Death:
    """kill -9 of the daemon's process group (the whole node's share of it: see the module docstring)."""
    daemon = services.processes.pop(name)
    at_kill = progress(instance, ledger)
    runs_started = instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    tree = psutil.Process(daemon.pid).children(recursive=True)
    run_processes = 0
    for process in tree:
        with suppress(psutil.Error):
            run_processes += "spawn_main" in " ".join(process.cmdline())
    os.killpg(daemon.pid, signal.SIGKILL)
    wall = time.time()
    daemon.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=10)
    survivors = []
    for process in alive:
        with suppress(psutil.Error):
            survivors.append(" ".join(process.cmdline()))
    return Death(moment.phase, delay, 0.0, wall, at_kill, runs_started, run_processes, survivors)


def wait_for_moment(moment: Moment, instance: DagsterInstance, ledger: Ledger) -> Progress:
    """Until the moment's phase has begun, or every brief is stored, or MOMENT_SECONDS have passed."""
    give_up = time.monotonic() + MOMENT_SECONDS
    while True:
        now = progress(instance, ledger)
        if moment.begun(now) or now.stored == len(BRIEFS) or time.monotonic() > give_up:
            return now
        time.sleep(MOMENT_POLL_SECONDS)


def wait_until_every_brief_stored(instance: DagsterInstance, ledger: Ledger, services: ServiceProcesses) -> None:
    """Until every brief has a stored video: fails after STORED_DEADLINE_SECONDS, or as soon as nothing has moved for
    STALL_SECONDS, naming the briefs not stored and the runs not finished."""
    give_up = time.monotonic() + STORED_DEADLINE_SECONDS
    last, moved = None, time.monotonic()
    while True:
        now = progress(instance, ledger)
        if now.stored == len(BRIEFS):
            return
        # Discovery ticks are no progress: the schedule goes on ticking (and skipping) over a stuck batch.
        moving = (now.stored, now.answered, Counter(run.status.value for run in instance.get_runs()))
        if moving != last:
            last, moved = moving, time.monotonic()
        if services.exited() or time.monotonic() > min(give_up, moved + STALL_SECONDS):
            unfinished = [run_state(instance, run) for run in unfinished_runs(instance)]
            raise AssertionError(
                f"briefs not stored: {sorted(set(BRIEFS) - warm.stored_briefs(instance))}; {now}; runs unfinished: "
                f"{unfinished}; exited: {services.exited()}; logs in {services.log_dir}"
            )
        time.sleep(warm.POLL_SECONDS)


def run_state(instance: DagsterInstance, run: DagsterRun) -> tuple[str, str, str | None, str]:
    """A run left unfinished, for the failure message: job, status, partition, and its last event and its age."""
    events = instance.all_logs(run.run_id)
    last = f"{time.time() - events[-1].timestamp:.0f} s ago: {events[-1].message[:160]}" if events else "no event"
    return run.job_name, run.status.value, run.tags.get("dagster/partition"), last


def assert_bought_at_most_once(emulator: RivyaEmulator, ledger: Ledger) -> None:
    """At most one ledger row (one Idempotency-Key) per brief, at most one charge per row, and every task the ledger
    recorded charged once (a create killed before its answer leaves a row without a task and perhaps a charge)."""
    spend = ledger.spend_report()
    assert all(row["tasks"] == 1 for row in spend), spend
    recorded = [record.task_id for brief_id in BRIEFS if (record := ledger.latest_for_brief(brief_id))]
    charged = Counter(charge["task_id"] for charge in emulator.stats()["charges"])
    assert sum(charged.values()) <= len(recorded) and all(charged[task] == 1 for task in recorded if task), charged


def unfinished_runs(instance: DagsterInstance) -> Sequence[DagsterRun]:
    return instance.get_runs(RunsFilter(statuses=UNFINISHED))


def stored_materializations(instance: DagsterInstance) -> dict[str, set[tuple[str, str]]]:
    """brief -> the (task id, SHA-256) its stored_video materializations name."""
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=warm.STORED_VIDEO), limit=10 * len(BRIEFS))
    named: dict[str, set[tuple[str, str]]] = {}
    for record in records.records:
        metadata = metadata_values(record.asset_materialization)
        named.setdefault(str(record.partition_key), set()).add((metadata["task_id"], metadata["sha256"]))
    return named


@pytest.fixture
def settings(pipeline_settings: Settings, tmp_path: Path) -> Settings:
    """30 text-only briefs of 3 s; discovery every minute; the ledger follows the instance."""
    folder = tmp_path / "death_briefs"
    folder.mkdir()
    for index, brief_id in enumerate(BRIEFS):
        (folder / f"{brief_id}.yaml").write_text(BRIEF_TEXT.format(id=brief_id, index=index), encoding="utf-8")
    return dataclasses.replace(pipeline_settings, requests_path=folder, ledger_url=None, discovery_cron=EVERY_MINUTE)


@pytest.mark.soak
@pytest.mark.slow
@pytest.mark.timeout(720)
@pytest.mark.parametrize(
    "profile",
    [
        pytest.param("default"),
        pytest.param("celery", marks=pytest.mark.postgres),
    ],
)
def test_five_daemon_deaths_lose_no_brief_and_buy_none_twice(
    profile: str,
    settings: Settings,
    emulator: RivyaEmulator,
    client: RivyaClient,
    s3_bucket: tuple[Any, str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.randrange(2**32))
    rng = random.Random(seed)
    delays = [rng.uniform(0.0, moment.max_delay_seconds) for moment in MOMENTS]
    print(f"\n[{profile}] {SEED_ENV}={seed}; delays after each phase begins: {[round(d, 2) for d in delays]}")
    deaths: list[Death] = []
    with ExitStack() as stack:
        deployment = stack.enter_context(deployed(profile, request, tmp_path))
        for name, value in deployment.env.items():
            monkeypatch.setenv(name, value)
        # This process opens the instance and the ledger first: both exist before any other process uses them.
        instance = stack.enter_context(DagsterInstance.from_config(str(deployment.home)))
        ledger = Ledger(default_ledger_url(instance))
        stack.callback(ledger.close)
        services = ServiceProcesses(warm.services_env(settings, deployment.env), log_dir=tmp_path / "logs")
        stack.callback(services.stop)
        if deployment.target is None:
            services.start("daemon", daemon_command())
        else:
            warm.start_warm_services(services, WORKERS, WORKER_CONCURRENCY)
        began = time.monotonic()

        daemon = "daemon"
        for number, (moment, delay) in enumerate(zip(MOMENTS, delays, strict=True), start=1):
            wait_for_moment(moment, instance, ledger)
            time.sleep(delay)
            death = kill_daemon_group(services, daemon, instance, ledger, moment, delay)
            death = dataclasses.replace(death, at=round(time.monotonic() - began, 1))
            deaths.append(death)
            print(
                f"[{profile}] kill {number} ({moment.phase}, +{delay:.2f} s) at {death.at} s: {death.progress}, "
                f"{death.runs_started} run(s) started, {death.run_processes} run process(es) in the group"
            )
            # A node drain ends every process of the daemon's group: no run process of the default launcher outlives
            # it (run monitoring fails its run, run retries start it again).
            assert not death.survivors, death.survivors
            daemon = f"daemon-{number}"
            services.start(daemon, daemon_command())
        last_kill = deaths[-1].wall

        try:
            wait_until_every_brief_stored(instance, ledger, services)
        finally:
            assert_bought_at_most_once(emulator, ledger)  # whether or not the batch finished
        stored_at = time.monotonic() - began
        warm.wait_for(lambda: not unfinished_runs(instance), "no run left unfinished", services, SETTLE_SECONDS)
        discovery_after = warm.wait_for(
            lambda: [t for t in ticks_of(instance, "SCHEDULE") if t.timestamp > last_kill],
            "a discovery tick after the last kill",
            services,
            SETTLE_SECONDS,
        )
        sensor_after = [tick for tick in ticks_of(instance, "SENSOR") if tick.timestamp > last_kill]
        print(f"[{profile}] every brief stored {stored_at:.0f} s after the daemon first started")
        records = {brief_id: ledger.latest_for_brief(brief_id) for brief_id in BRIEFS}
        spend = ledger.spend_report()
        runs = instance.get_runs()
        materialized = stored_materializations(instance)

    # The kills happened in every phase of the batch's life, not all after it.
    assert [death.phase for death in deaths] == [moment.phase for moment in MOMENTS]
    assert all(death.progress.stored < len(BRIEFS) for death in deaths), deaths

    # Nothing bought twice: one charge of 90 credits per brief, one ledger row per brief, and Rivya's record of each
    # brief's Idempotency-Key names that row's task (a re-send under the key replays it, free).
    stats = emulator.stats()
    charges = stats["charges"]
    assert len(charges) == len(BRIEFS) and stats["creates_performed"] == len(BRIEFS)
    assert sum(charge["credits"] for charge in charges) == len(BRIEFS) * KLING_PRICE
    assert {charge["credits"] for charge in charges} == {KLING_PRICE}
    assert stats["wallets"][TEST_ACCOUNT] == TEST_CREDITS - len(BRIEFS) * KLING_PRICE
    assert sorted(row["brief_id"] for row in spend) == sorted(BRIEFS)
    assert {row["tasks"] for row in spend} == {1}
    assert all(record is not None and record.task_id for record in records.values())
    tasks = {brief_id: str(record.task_id) for brief_id, record in records.items() if record}
    assert sorted(charge["task_id"] for charge in charges) == sorted(tasks.values())
    for record in records.values():
        assert record is not None
        assert client.create_generation(record.body, idempotency_key=record.idempotency_key).id == record.task_id
    assert emulator.stats()["creates_performed"] == len(BRIEFS)

    # Nothing lost, nothing stored twice: one video per brief in S3, the bytes its ledger row recorded, and
    # stored_video materializations that name that video only. A store killed after the partition's materialization
    # but before the ledger's mark is stored and recorded again (same task, same bytes): at least once, by design.
    videos = warm.s3_videos(s3_bucket, settings.s3_prefix)
    assert {brief_id: len(keys) for brief_id, keys in videos.items()} == dict.fromkeys(BRIEFS, 1)
    for brief_id, (key,) in videos.items():
        record = records[brief_id]
        assert record is not None and record.stored_uri and record.stored_uri.endswith(key)
        assert key.endswith(f"/{brief_id}/{record.task_id}.mp4")
        assert hashlib.sha256(s3_bytes(s3_bucket, key)).hexdigest() == record.stored_sha256
    assert materialized == {
        brief_id: {(str(record.task_id), str(record.stored_sha256))} for brief_id, record in records.items() if record
    }
    assert sorted(materialized) == sorted(BRIEFS)

    # The daemon kept working after the last kill: its sensor and its discovery schedule ticked again.
    assert sensor_after and discovery_after
    failed = [(run.job_name, run.status.value) for run in runs if run.status != DagsterRunStatus.SUCCESS]
    print(f"[{profile}] {len(runs)} runs, not succeeded: {failed}; {time.monotonic() - began:.0f} s in all")
