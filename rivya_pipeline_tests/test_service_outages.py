"""Lost connections to the warm-worker profile's services (deploy/celery/dagster.yaml), executed: the Dagster
daemon (with its code server, where the sensor runs) and two Celery workers reach this machine's PostgreSQL and
RabbitMQ only through a TCP fault proxy each (tcp_fault_proxy.py), and one of them is cut for 60 s while paid
submits and stores are in flight: every open connection reset, every new one refused, then forwarded again. The
machine's own servers are never stopped; the test itself reads the instance, the ledger and the broker directly.

Afterwards, within a bounded deadline: every brief bought once (one charge of 90 credits each on the emulator)
and stored once (one .mp4 each in S3, its ledger row stored), the daemon and both workers still running (no
supervisor here: a process that exits on a lost connection is a finding), the sensor ticking again after the cut.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.scheduler.instigation import TickData, TickStatus
from dagster._serdes import deserialize_value
from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG as CELERY_TASK_TAG

from rivya_pipeline.defs.resources import default_ledger_url
from rivya_pipeline.defs.sensors import PARTITION_TAG, UNFINISHED
from rivya_pipeline.emulator import FaultRule, RivyaEmulator
from rivya_pipeline.ledger import Ledger
from rivya_pipeline.settings import Settings
from rivya_pipeline.workers import CeleryTarget, ServiceProcesses, delete_queue
from rivya_pipeline_tests import warm_workers as warm
from rivya_pipeline_tests.fixtures_emulator import TEST_ACCOUNT, TEST_CREDITS
from rivya_pipeline_tests.helpers import KLING_PRICE, s3_bytes
from rivya_pipeline_tests.tcp_fault_proxy import ProxyCounts, TcpFaultProxy

BRIEFS = [f"outage-{index}" for index in range(10)]
WORKERS = 2
CUT_SECONDS = 60.0
# After the cut ends: reconnecting, monitoring, run retries and the sensor's store retries all have to happen.
RECOVERY_SECONDS = 150.0
SLOW_CREATE_SECONDS = 2.0  # every create answers after 2 s: submits are in flight when the cut comes
SLOW_MEDIA_SECONDS = 1.0
INSTANCE_OVERRIDES = {
    # start_timeout_seconds: a run whose Celery task was lost before it started (see the test) is failed and
    # retried within the test's deadline rather than after the profile's 300 s.
    "run_monitoring": {"poll_interval_seconds": 1, "free_slots_after_run_end_seconds": 1, "start_timeout_seconds": 90},
}
SENSOR = "pending_generation_tasks"
ERROR_MARKERS = ("Traceback", "ERROR", "Error", "error:", "exited", "Connection refused", "reset by peer")


@dataclass(frozen=True)
class Stack:
    """The services' view (through the proxies) and the test's own (direct)."""

    database: str
    direct: CeleryTarget
    proxied: CeleryTarget
    pg_proxy: TcpFaultProxy
    mq_proxy: TcpFaultProxy

    @property
    def direct_url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{self.database}"


@pytest.fixture
def stack(pg_database: str) -> Iterator[Stack]:
    warm.skip_without_broker()
    queue = warm.broker_queue_name()
    with TcpFaultProxy("127.0.0.1", 5432, "pg-proxy") as pg_proxy, TcpFaultProxy("127.0.0.1", 5672, "mq-proxy") as mq:
        backend = "db+postgresql+psycopg2://postgres@127.0.0.1:{port}/" + pg_database
        direct = CeleryTarget(broker=warm.BROKER, backend=backend.format(port=5432), queue=queue)
        proxied = CeleryTarget(
            broker=f"pyamqp://guest@127.0.0.1:{mq.port}//", backend=backend.format(port=pg_proxy.port), queue=queue
        )
        yield Stack(pg_database, direct, proxied, pg_proxy, mq)
    delete_queue(direct)


@pytest.fixture
def settings(pipeline_settings: Settings, tmp_path: Path) -> Settings:
    return warm.warm_settings(pipeline_settings, tmp_path / "outage_briefs", BRIEFS)


@pytest.fixture
def instance(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DagsterInstance]:
    """The deployment's instance and ledger as this process sees them: PostgreSQL directly, never the proxy."""
    home = warm.write_celery_home(tmp_path / "celery_home", stack.direct.queue, INSTANCE_OVERRIDES)
    for name, value in warm.deployment_variables(home, stack.database, stack.direct).items():
        monkeypatch.setenv(name, value)
    with DagsterInstance.from_config(str(home)) as instance:
        Ledger(default_ledger_url(instance)).close()
        yield instance


@pytest.fixture
def services(settings: Settings, stack: Stack, instance: DagsterInstance, tmp_path: Path) -> Iterator[ServiceProcesses]:
    """The daemon and two workers, whose PostgreSQL (instance, ledger, result backend) and broker are the proxies."""
    home = Path(instance.root_directory)
    env = warm.deployment_variables(home, stack.database, stack.proxied, pg_port=stack.pg_proxy.port)
    processes = ServiceProcesses(warm.services_env(settings, env), log_dir=tmp_path / "logs")
    try:
        yield warm.start_warm_services(processes, WORKERS)
    finally:
        processes.stop()


# -- the proxy itself ----------------------------------------------------------------------------------------------


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP echo server on a free port of 127.0.0.1 (its port), in a thread of its own."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(4096):
                conn.sendall(data)

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                threading.Thread(target=echo, args=(server.accept()[0],), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def echo_through(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        return conn.recv(4096)


def test_the_proxy_forwards_cuts_live_connections_and_refuses_new_ones_until_the_cut_ends(echo_server: int) -> None:
    with TcpFaultProxy("127.0.0.1", echo_server) as proxy:
        live = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        live.sendall(b"hello")
        assert live.recv(4096) == b"hello"

        proxy.cut(1.0)
        with pytest.raises(OSError):  # reset (RST) at once: the next read fails, or sees the end
            live.sendall(b"again")
            if not live.recv(4096):
                raise ConnectionResetError("closed")
        live.close()
        with pytest.raises(OSError):  # a new connection during the cut is accepted and reset at once
            if not echo_through(proxy.port, b"during"):
                raise ConnectionResetError("closed")

        wait_until = time.monotonic() + 5
        while proxy.is_cut():
            assert time.monotonic() < wait_until
            time.sleep(0.05)
        assert echo_through(proxy.port, b"after") == b"after"
        assert proxy.counts() == ProxyCounts(accepted=2, cut=1, refused=1)


# -- what the test reads ------------------------------------------------------------------------------------------


def in_flight(instance: DagsterInstance, ledger: Ledger) -> bool:
    """Some briefs have their task, others not yet, and a run is executing: submits (and stores) in flight."""
    records = [ledger.latest_for_brief(brief_id) for brief_id in BRIEFS]
    with_task = [record for record in records if record is not None and record.task_id]
    started = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    return 2 <= len(with_task) < len(BRIEFS) and bool(started)


def all_done(instance: DagsterInstance) -> bool:
    return warm.stored_briefs(instance) == set(BRIEFS) and not instance.get_runs(RunsFilter(statuses=UNFINISHED))


def query(direct_url: str, sql: str) -> list[Any]:
    engine = sqlalchemy.create_engine(direct_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sqlalchemy.text(sql)))
    finally:
        engine.dispose()


def sensor_ticks(direct_url: str) -> list[TickData]:
    rows = query(direct_url, "SELECT tick_body FROM job_ticks WHERE type = 'SENSOR'")
    ticks = [deserialize_value(body, TickData) for (body,) in rows]
    return [tick for tick in ticks if tick.instigator_name == SENSOR]


def unfinished_runs(instance: DagsterInstance, direct_url: str) -> list[str]:
    """Each unfinished run with its brief and what Celery's result backend says of its task."""
    states = dict(query(direct_url, "SELECT task_id, status FROM celery_taskmeta"))
    return [
        f"{run.job_name} {run.run_id[:8]} {run.status.value} brief={run.tags.get(PARTITION_TAG)} "
        f"celery={states.get(run.tags.get(CELERY_TASK_TAG, ''), 'no row')}"
        for run in instance.get_runs(RunsFilter(statuses=UNFINISHED))
    ]


def sensor_ticked_after(direct_url: str, moment: float) -> list[TickData]:
    ok = {TickStatus.SUCCESS, TickStatus.SKIPPED}
    return [tick for tick in sensor_ticks(direct_url) if tick.timestamp > moment and tick.status in ok]


def service_pids(services: ServiceProcesses) -> dict[str, list[int]]:
    """The long-lived processes: the daemon, its code server, `rivya-pipeline workers` and its Celery workers."""
    found: dict[str, list[int]] = {"daemon": [services.processes["daemon"].pid]}
    found["workers"] = [services.processes["workers"].pid]
    for process in services.descendants():
        try:
            command = " ".join(process.cmdline())
            parent = process.ppid()
        except psutil.Error:
            continue
        if "grpc" in command:
            found.setdefault("code_server", []).append(process.pid)
        elif "celery" in command and parent == services.processes["workers"].pid:
            found.setdefault("celery_workers", []).append(process.pid)
    return {name: sorted(pids) for name, pids in found.items()}


def log_findings(services: ServiceProcesses) -> dict[str, list[str]]:
    """Each log's lines that speak of an error or a lost connection (the first of each kind, for the report)."""
    findings: dict[str, list[str]] = {}
    assert services.log_dir is not None
    for log in sorted(services.log_dir.glob("*.log")):
        seen: set[str] = set()
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if any(marker in line for marker in ERROR_MARKERS):
                shape = line[line.find(" - ") + 3 :][:100] if " - " in line else line[:100]
                if shape not in seen:
                    seen.add(shape)
                    findings.setdefault(log.name, []).append(line[:300])
    return findings


def runs_of_unstored_briefs(instance: DagsterInstance) -> dict[str, list[str]]:
    """For each brief not stored: its runs, oldest first, with the retry number and how each ended."""
    unstored = set(BRIEFS) - warm.stored_briefs(instance)
    found: dict[str, list[str]] = {}
    for run in reversed(instance.get_runs()):
        brief_id = run.tags.get(PARTITION_TAG)
        if brief_id not in unstored:
            continue
        ends = [e.message for e in instance.all_logs(run.run_id) if e.is_dagster_event and e.message]
        last = (ends[-1] if ends else "")[:140].replace("\n", " ")
        retry = run.tags.get("dagster/retry_number", "0")
        found.setdefault(brief_id, []).append(f"{run.job_name} retry={retry} {run.status.value}: {last}")
    return found


def ledger_of_unstored_briefs(instance: DagsterInstance, ledger: Ledger) -> dict[str, str]:
    """For each brief not stored: its ledger row's state (no row: no create was ever sent)."""
    found = {}
    for brief_id in sorted(set(BRIEFS) - warm.stored_briefs(instance)):
        record = ledger.latest_for_brief(brief_id)
        found[brief_id] = "no row" if record is None else f"{record.status} sent={record.submitted_at:%H:%M:%S}"
    return found


def run_outcomes(instance: DagsterInstance) -> dict[str, int]:
    return dict(Counter(f"{run.job_name}:{run.status.value}" for run in instance.get_runs()))


def failed_runs_per_brief(instance: DagsterInstance) -> dict[str, int]:
    """brief -> how many of its runs failed (a store batch counts for none: it has no partition)."""
    failed = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
    return dict(Counter(str(run.tags.get(PARTITION_TAG)) for run in failed))


# -- the scenario --------------------------------------------------------------------------------------------------


@pytest.mark.soak
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("service", ["postgres", "rabbitmq"])
def test_a_service_cut_for_a_minute_while_submits_and_stores_are_in_flight(
    service: str,
    emulator: RivyaEmulator,
    s3_bucket: tuple[Any, str],
    stack: Stack,
    instance: DagsterInstance,
    services: ServiceProcesses,
    settings: Settings,
) -> None:
    """One of the two services cut for 60 s (`service`) once the discovery tick's submits are running: some briefs
    have their paid task, the others' runs are executing or wait in the broker, stores follow. Each failure mode
    named here was seen in this test's logs (deploy/celery/dagster.yaml; Dagster 1.13, Celery 5.7):

    PostgreSQL (the instance, the ledger and Celery's result backend are all behind the cut):
    - P1 run tasks consumed and dropped: a worker that takes a run task during the cut cannot store the task's
      STARTED state (Celery's database backend retries 3 times in ~70 ms), fails the task outside its body and
      acknowledges it. The run never starts and stays STARTING until run monitoring's start_timeout_seconds fails
      it (300 s in the profile, 90 s here).
    - P2 run retries dropped: those failed runs are retried by the daemon's run retries only if the code location
      loads at that moment. The daemon's code server stops itself after 20 s without the daemon's heartbeat and the
      one started in its place cannot open the instance during the cut ("Error while importing code"); the daemon
      keeps that load error for up to a minute after the cut, and a retry attempted then fails ("Failed to retry
      run") and is never attempted again. Discovery counts a failed run as launched: the brief is never submitted.
      Where the failed run had sent its create (its answer lost in the cut), the ledger row stays "submitting" and
      the sensor re-sent it only 10 minutes after sending (seen in 4 of 9 loops: the brief unstored at the end).
    - P3 runs in flight hang: a run executing when the cut begins loses its RUN_SUCCESS/RUN_FAILURE event (Dagster
      logs "Exception while writing logger call to event log" and goes on) and its worker cannot store the task's
      end state either, so the run stays STARTED, monitoring reads the task as STARTED (running), and only
      max_runtime_seconds (3600 s) ends it. Meanwhile the sensor does not store its brief (a run is in progress).
    - Recovered by themselves: the daemon's threads log errors and go on; the workers' pool processes reconnect;
      the sensor's ticks fail during the cut and succeed after it.

    RabbitMQ (the daemon's run queue sends runs there; the workers consume from it):
    - M1 launches fail: each run dequeued during the cut fails at launch ("Caught an error dequeuing run"); for a
      store run the sensor requests another on its next tick, so a video's store is tried on every tick (5-10 s
      here), each a FAILURE run, until the broker is back: their number is bounded only by the outage's length.
    - M3 run retries spent during the outage: a submit run that failed at launch is retried at once by the run
      retries, and both retries fail the same way seconds later. Discovery counts those failed runs as the brief's
      launch and no create was ever sent, so nothing (sensor, resend) submits the brief again: it is lost.
    - M4 a run task launched seconds before the cut never reaches a worker (its Celery state stays PENDING): the
      run stays STARTING until start_timeout_seconds, then it is failed and retried.
    - M2 late acknowledgements lost: a worker executing a run when its connection goes cannot acknowledge it
      ("Couldn't ack"); the broker redelivers the task, and Dagster ignores it as a run already started.
    - Recovered by themselves: the workers' consumers reconnect (Celery retries the connection), runs queued in the
      broker before the cut are executed after it.

    How each is handled now: P1, the workers' result backend is retried for ~10 minutes (celery_app.py), so a
    run task taken during the cut waits for the database instead of being dropped; P2 and M3, discovery relaunches
    a version whose every run failed before its create was sent (schedules.py), and the sensor re-sends a create
    once every run that may have sent it has ended (sensors.py); P3, the launcher reports a task
    that ended under a run still STARTED as a failed worker (celery_launcher.py), so monitoring fails the run and
    run retries start it again; M1, the sensor keeps the store backoff from a video's last failed run; M4, run
    monitoring's start timeout.

    Asserted after the cut, within RECOVERY_SECONDS: every brief stored once and bought once, no run left
    unfinished, the daemon and both workers the same processes as before, the sensor ticking again.
    """
    proxy = stack.pg_proxy if service == "postgres" else stack.mq_proxy
    emulator.set_faults(
        [
            FaultRule(endpoint="create_generation", kind="slow", delay=SLOW_CREATE_SECONDS),
            FaultRule(endpoint="media", kind="slow", delay=SLOW_MEDIA_SECONDS),
        ]
    )
    ledger = Ledger(default_ledger_url(instance))
    report: dict[str, Any] = {"proxy": proxy.name}
    try:
        warm.wait_for(lambda: in_flight(instance, ledger), "submits in flight", services)
        report["pids_before"] = service_pids(services)
        report["before_cut"] = {"runs": run_outcomes(instance), "stored": len(warm.stored_briefs(instance))}
        proxy.cut(CUT_SECONDS)
        cut_at = time.time()
        report["cut_counts"] = dataclasses.asdict(proxy.counts())
        warm.wait_for(lambda: not proxy.is_cut(), "the end of the cut", services, CUT_SECONDS + 5)
        cut_end = time.time()
        report["during_cut"] = {"runs": run_outcomes(instance), "stored": len(warm.stored_briefs(instance))}
        try:
            warm.wait_for(lambda: all_done(instance), "every brief stored after the cut", services, RECOVERY_SECONDS)
        except AssertionError as exc:
            stored = sorted(warm.stored_briefs(instance))
            unfinished = unfinished_runs(instance, stack.direct_url)
            raise AssertionError(f"{exc}\nstored: {stored}\nunfinished: {unfinished}") from None
        report["recovered_after_s"] = round(time.time() - cut_end, 1)
        ticks = warm.wait_for(
            lambda: sensor_ticked_after(stack.direct_url, cut_end), "a sensor tick after the cut", services, 60
        )
        report["first_good_tick_after_cut_s"] = round(min(tick.timestamp for tick in ticks) - cut_end, 1)
        report["failed_ticks_during_cut"] = sum(
            1
            for tick in sensor_ticks(stack.direct_url)
            if tick.status == TickStatus.FAILURE and tick.timestamp > cut_at
        )
        records = {brief_id: ledger.latest_for_brief(brief_id) for brief_id in BRIEFS}
    finally:
        report["counts_end"] = dataclasses.asdict(proxy.counts())
        report["pids_after"] = service_pids(services)
        report["exited"] = services.exited()
        report["runs"] = run_outcomes(instance)
        report["failed_runs_per_brief"] = failed_runs_per_brief(instance)
        try:
            report["runs_of_unstored_briefs"] = runs_of_unstored_briefs(instance)
            report["ledger_of_unstored_briefs"] = ledger_of_unstored_briefs(instance, ledger)
        except Exception as exc:  # a report, never the test's failure
            report["runs_of_unstored_briefs"] = repr(exc)
        report["logs"] = log_findings(services)
        ledger.close()
        print(json.dumps(report, indent=1, default=str))

    # Nothing bought twice: one charge of 90 credits per brief, for the task its ledger row holds.
    stats = emulator.stats()
    charged = sorted(charge["task_id"] for charge in stats["charges"])
    assert charged == sorted(str(record and record.task_id) for record in records.values()), stats["charges"]
    assert [charge["credits"] for charge in stats["charges"]] == [KLING_PRICE] * len(BRIEFS)
    assert stats["wallets"][TEST_ACCOUNT] == TEST_CREDITS - KLING_PRICE * len(BRIEFS)
    assert stats["creates_performed"] == len(BRIEFS)

    # Nothing lost: one video per brief in S3, the bytes its ledger row recorded as stored.
    videos = warm.s3_videos(s3_bucket, settings.s3_prefix)
    assert {brief_id: len(keys) for brief_id, keys in videos.items()} == dict.fromkeys(BRIEFS, 1)
    for brief_id, (key,) in videos.items():
        record = records[brief_id]
        assert record is not None and record.stored_uri, brief_id
        assert key.endswith(f"/{brief_id}/{record.task_id}.mp4")
        assert hashlib.sha256(s3_bytes(s3_bucket, key)).hexdigest() == record.stored_sha256

    # The cut really cut: live connections were reset; the services connected again through the proxy.
    assert report["cut_counts"]["cut"] >= 1
    assert report["counts_end"]["accepted"] > report["cut_counts"]["accepted"]
    # The same daemon and workers as before the cut, nothing exited (there is no supervisor here).
    assert not report["exited"]
    before, after = report["pids_before"], report["pids_after"]
    assert {name: before[name] for name in ("daemon", "workers", "celery_workers")} == {
        name: after.get(name) for name in ("daemon", "workers", "celery_workers")
    }
