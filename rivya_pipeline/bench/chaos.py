"""`bench chaos`: the production path with every fault at once, and what is left of the batch afterwards.

The daemon (and, where this machine has RabbitMQ and PostgreSQL, the warm workers: deploy/celery/dagster.yaml)
takes N briefs from the folder to S3 while, all in one run:

- the API loses the answers of the first two creates and then of a share of them (performed, then a 500: the re-send
  under the key replays the task), and answers the first two calls, then a share of all, with 429 + Retry-After;
- the media host that serves results is down (503) for 3 minutes from the first download;
- S3, behind a fault proxy, refuses every request (503 SlowDown) for 2 minutes from the moment the media host is up;
- one run's process is killed with kill -9 as soon as a submit runs (a worker's pool process, or a default-launcher
  run process), and the daemon's whole process group is killed three times: once a quarter of the creates are
  answered, a third of the way into the media outage and a third of the way into the S3 outage (each time restarted
  at once, as a supervisor would).

Each fault comes at its own moment, so they overlap as they fall (on 200 briefs the media outage opens while submits
still run).

The verdict comes from the emulator's charges and from the S3 server behind the proxy, never from the pipeline's own
account: per brief, `stored` (its video in S3), else `lost` (Rivya charged for it: paid work without a video), else
`abandoned` (never bought). `duplicate_charges` counts charges beyond one per brief; a charge the ledger cannot
name a brief for counts as lost. `minutes_to_heal` runs from the end of the last fault (outage or kill) to every
brief stored. Goal: 0 / 0 / 0, every brief stored, healed within 15 minutes.

The full run keeps the profile's own numbers (store retry 1, 2, 4 ... min; run monitoring and its 5 min start
timeout): healing then follows the production backoff. `--quick` shortens the outages and those intervals so CI can
check that the benchmark runs and what it reports holds together.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from unittest import mock

import psutil
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from ..defs.assets import BATCH_TAG
from ..defs.resources import default_ledger_url
from ..emulator import FaultRule
from ..emulator.s3_fault_proxy import S3FaultProxy
from ..ledger import Ledger
from ..workers import ServiceProcesses, daemon_command, profile_with
from .common import BenchResult, Figure
from .scale import (
    GENERATION,
    Deployment,
    celery_unavailable,
    deployment,
    sleep_until_before_next_tick,
    start_deployment,
    write_briefs,
)
from .stack import BENCH_BUCKET, BenchStack

FULL_BRIEFS = 200
QUICK_BRIEFS = 20
GOAL_MINUTES_TO_HEAL = 15.0
LOST_ANSWER_RATE = 0.05
RATE_LIMITED_RATE = 0.03
SEED = 20261202
STARTED_PID = re.compile(r"Started process for run \(pid: (\d+)\)")
POLL_SECONDS = 0.5
MIN_DAEMON_LIFE_SECONDS = 10.0  # between two kills: a daemon that never got to tick is no second death


@dataclass(frozen=True)
class Plan:
    """How long each outage lasts, how long to wait for the batch to heal, and the pipeline's intervals."""

    media_outage_seconds: float
    s3_outage_seconds: float
    heal_deadline_seconds: float  # after the last fault: then the bench reports what is left
    moment_seconds: float  # how long a kill waits for its moment before it strikes anyway
    env: dict[str, str]  # pipeline settings beyond the benchmark stack's
    instance_overrides: dict[str, object]


FULL = Plan(180.0, 120.0, 20 * 60.0, 600.0, {}, {})
QUICK = Plan(
    30.0,
    20.0,
    8 * 60.0,
    180.0,
    {
        "RIVYA_STORE_RETRY_FIRST_SECONDS": "5",
        "RIVYA_STORE_RETRY_MAX_SECONDS": "20",
        "RIVYA_RELAUNCH_FIRST_SECONDS": "10",
    },
    {"run_monitoring": {"poll_interval_seconds": 2, "start_timeout_seconds": 60}},
)


def api_faults(plan: Plan) -> list[FaultRule]:
    """Each API fault strikes its first two chances for certain (a quick run meets it too), then at its rate."""
    return [
        FaultRule(endpoint="create_generation", kind="lost_response", times=2),
        FaultRule(endpoint="api", kind="rate_limited", times=2),
        FaultRule(endpoint="create_generation", kind="lost_response", rate=LOST_ANSWER_RATE),
        FaultRule(endpoint="api", kind="rate_limited", rate=RATE_LIMITED_RATE),
        FaultRule(endpoint="media", kind="server_error", status=503, for_seconds=plan.media_outage_seconds),
    ]


@dataclass
class Strike:
    """One fault: done once `due()` holds (or, for a kill, once `Plan.moment_seconds` have passed without it)."""

    name: str
    due: Callable[[], bool]
    act: Callable[[], None]
    may_wait_forever: bool = False  # an outage armed by another's end: its moment always comes
    done: bool = False


class Chaos:
    """The running batch and the faults done to it, each at its own moment, so they overlap as they fall."""

    def __init__(
        self,
        stack: BenchStack,
        deployed: Deployment,
        instance: DagsterInstance,
        ledger: Ledger,
        proxy: S3FaultProxy,
        plan: Plan,
        log: Path,
    ) -> None:
        self.stack, self.deployed, self.instance, self.ledger = stack, deployed, instance, ledger
        self.proxy, self.plan = proxy, plan
        self.services = ServiceProcesses(deployed.env, log_dir=log)
        self.daemon = "daemon"
        self.daemon_started = time.monotonic()
        self.fault_ends: list[float] = []  # time.time() of each fault's end
        self.events: list[str] = []
        self.began = time.monotonic()

    def note(self, event: str) -> None:
        line = f"chaos +{time.monotonic() - self.began:6.1f} s: {event}"
        self.events.append(line)
        print(line, file=sys.stderr, flush=True)

    # -- what the strikes look at ----------------------------------------------------------------

    def running_submit_pid(self) -> int | None:
        for run in self.instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
            if BATCH_TAG not in run.tags:
                continue
            for event in self.instance.all_logs(run.run_id):
                if match := STARTED_PID.match(event.message or ""):
                    return int(match.group(1))
        return None

    def answered(self) -> int:
        by_status = self.ledger.count_by_status()
        return sum(by_status.values()) - by_status.get("submitting", 0)

    def media_window(self) -> tuple[float, float] | None:
        """(opened, closes) of the media outage, time.time() seconds, once the first download opened it."""
        windows = [window for window in self.stack.stats()["fault_windows"] if window["endpoint"] == "media"]
        if not windows or not windows[0]["opened_wall"]:
            return None
        opened, closes = (datetime.fromisoformat(windows[0][key]).timestamp() for key in ("opened_wall", "closes_wall"))
        return opened, closes

    def s3_window(self) -> tuple[float, float] | None:
        """(opened, closes) of the S3 outage, time.time() seconds, once a request opened it."""
        ends = self.proxy.outage_ends()
        if ends is None:
            return None
        closes = time.time() + ends - time.monotonic()
        return closes - self.plan.s3_outage_seconds, closes

    def daemon_up_for(self) -> float:
        return time.monotonic() - self.daemon_started

    # -- the strikes -------------------------------------------------------------------------------

    def kill_daemon(self, when: str) -> None:
        """kill -9 of the daemon's process group (a node drain: on the default profile its run processes too)."""
        daemon = self.services.processes.pop(self.daemon)
        tree = psutil.Process(daemon.pid).children(recursive=True)
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=30)
        psutil.wait_procs(tree, timeout=10)
        self.fault_ends.append(time.time())
        self.daemon = f"daemon-{len(self.fault_ends)}"
        self.services.start(self.daemon, daemon_command())
        self.daemon_started = time.monotonic()
        self.note(f"daemon killed ({when}) and started again")

    def kill_run_process(self) -> None:
        pid = self.running_submit_pid()
        if pid is None:
            self.note("no submit run executing: no run process killed")
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
        self.fault_ends.append(time.time())
        self.note(f"kill -9 of the process executing a submit run (pid {pid})")

    def arm_s3_outage(self) -> None:
        self.proxy.go_down(self.plan.s3_outage_seconds)
        media = self.media_window()
        assert media is not None
        self.fault_ends.append(media[1])
        self.note(f"media host up again; S3 down for {self.plan.s3_outage_seconds:.0f} s from its next request")

    def within(self, window: tuple[float, float] | None) -> bool:
        """A third of the way into an outage (and the daemon up long enough to have ticked since its last kill)."""
        if window is None or self.daemon_up_for() < MIN_DAEMON_LIFE_SECONDS:
            return False
        opened, closes = window
        return opened + (closes - opened) / 3 <= time.time() < closes

    def strikes(self, count: int) -> list[Strike]:
        return [
            Strike("a run's process", lambda: self.running_submit_pid() is not None, self.kill_run_process),
            Strike(
                "the daemon while creates are answered",
                lambda: self.answered() >= count // 4 and self.daemon_up_for() >= MIN_DAEMON_LIFE_SECONDS,
                lambda: self.kill_daemon("creates being answered"),
            ),
            Strike(
                "the daemon during the media outage",
                lambda: self.within(self.media_window()),
                lambda: self.kill_daemon("media host down"),
            ),
            Strike(
                "S3",
                lambda: (media := self.media_window()) is not None and time.time() >= media[1],
                self.arm_s3_outage,
                may_wait_forever=True,
            ),
            Strike(
                "the daemon during the S3 outage",
                lambda: self.within(self.s3_window()),
                lambda: self.kill_daemon("S3 down"),
                may_wait_forever=True,
            ),
        ]

    def strike_all(self, count: int) -> None:
        """Every strike at its moment; a kill whose moment has not come within `Plan.moment_seconds` strikes anyway."""
        strikes = self.strikes(count)
        give_up = time.monotonic() + self.plan.moment_seconds
        while not all(strike.done for strike in strikes):
            if self.daemon in self.services.exited():
                raise RuntimeError(f"the daemon exited by itself (logs: {self.services.log_dir})")
            for strike in strikes:
                if strike.done:
                    continue
                late = time.monotonic() > give_up
                if strike.due() or (late and not strike.may_wait_forever):
                    if late and not strike.due():
                        self.note(f"{strike.name}: its moment not seen within {self.plan.moment_seconds:.0f} s")
                    strike.act()
                    strike.done = True
            if time.monotonic() > give_up + self.plan.heal_deadline_seconds:
                raise RuntimeError(f"the outages never opened: {[s.name for s in strikes if not s.done]}")
            time.sleep(POLL_SECONDS)
        s3 = self.s3_window()
        assert s3 is not None
        time.sleep(max(0.0, s3[1] - time.time()))
        self.fault_ends.append(s3[1])


def stored_briefs(stack: BenchStack) -> dict[str, set[str]]:
    """brief id -> task ids of its videos in the bucket (read from the S3 server itself, not through the proxy)."""
    found: dict[str, set[str]] = {}
    for page in stack.s3.get_paginator("list_objects_v2").paginate(Bucket=BENCH_BUCKET):
        for item in page.get("Contents", []):
            parts = item["Key"].split("/")
            if len(parts) >= 3 and parts[-1].endswith(".mp4"):
                found.setdefault(parts[-2], set()).add(parts[-1].removesuffix(".mp4"))
    return found


def verdict(stack: BenchStack, ledger: Ledger, brief_ids: list[str]) -> dict[str, int]:
    stored = stored_briefs(stack)
    charged: dict[str, int] = {}
    unattributed = 0
    for charge in stack.stats()["charges"]:
        if charge["refunded"]:
            continue
        record = ledger.find_by_task(charge["task_id"])
        if record is None:
            unattributed += 1
        else:
            charged[record.brief_id] = charged.get(record.brief_id, 0) + 1
    not_stored = [brief_id for brief_id in brief_ids if brief_id not in stored]
    return {
        "stored": len(brief_ids) - len(not_stored),
        "lost": sum(brief_id in charged for brief_id in not_stored) + unattributed,
        "abandoned": sum(brief_id not in charged for brief_id in not_stored),
        "duplicate_charges": sum(count - 1 for count in charged.values()),
        "stored_twice": sum(len(tasks) - 1 for tasks in stored.values()),
    }


def run(stack: BenchStack, quick: bool, briefs: int | None = None) -> BenchResult:
    count = briefs or (QUICK_BRIEFS if quick else FULL_BRIEFS)
    plan = QUICK if quick else FULL
    skipped = celery_unavailable()
    profile = "default" if skipped else "celery"
    stack.configure(**GENERATION, faults=api_faults(plan), seed=SEED)
    with contextlib.ExitStack() as opened:
        root = Path(opened.enter_context(tempfile.TemporaryDirectory(prefix="rivya-bench-chaos-")))
        proxy = opened.enter_context(S3FaultProxy(stack.s3_url, {}, seed=SEED))
        folder = root / "briefs"
        folder.mkdir()
        env = (
            stack.pipeline_env()
            | plan.env
            | {
                "AWS_ENDPOINT_URL_S3": proxy.url,
                "RIVYA_REQUESTS_PATH": str(folder),
                "RIVYA_DISCOVERY_CRON": "* * * * *",
            }
        )
        deployed = opened.enter_context(deployment(profile, root, env))
        if plan.instance_overrides:
            config = deployed.home / "dagster.yaml"
            config.write_text(profile_with(config, plan.instance_overrides), encoding="utf-8")
        opened.enter_context(mock.patch.dict(os.environ, deployed.env))
        # This process opens the instance and the ledger first: both exist before any other process uses them.
        instance = opened.enter_context(DagsterInstance.from_config(str(deployed.home)))
        ledger = Ledger(default_ledger_url(instance))
        opened.callback(ledger.close)
        chaos = Chaos(stack, deployed, instance, ledger, proxy, plan, root / "logs")
        opened.enter_context(chaos.services)
        start_deployment(deployed, instance, chaos.services)
        sleep_until_before_next_tick()
        write_briefs(folder, count)
        brief_ids = sorted(path.stem for path in folder.iterdir())
        chaos.note(f"{count} briefs in the folder ({profile} profile)")

        chaos.strike_all(count)
        last_fault = max(chaos.fault_ends)
        chaos.note("last fault over")

        heal_by = time.monotonic() + plan.heal_deadline_seconds
        healed_at = None
        while time.monotonic() < heal_by:
            if len(stored_briefs(stack)) >= count:
                healed_at = time.time()
                break
            time.sleep(2.0)
        chaos.note("every brief stored" if healed_at else "deadline passed with briefs not stored")
        figures = verdict(stack, ledger, brief_ids)
        runs = instance.get_runs()
        stats = stack.stats()
        s3_refused = sum(proxy.injected().values())
    stack.empty_bucket()
    injected = stats["faults_injected"]
    minutes_to_heal: Figure = round((healed_at - last_fault) / 60, 1) if healed_at else "not healed"
    result_figures: dict[str, Figure | dict[str, Figure]] = {
        "briefs": count,
        "profile": profile,
        **figures,
        "minutes_to_heal": minutes_to_heal,
        "faults": {
            "lost_create_answers": sum(n for kind, n in injected.items() if kind.endswith(":lost_response")),
            "rate_limited": sum(n for kind, n in injected.items() if kind.endswith(":rate_limited")),
            "media_503s": sum(n for kind, n in injected.items() if kind.startswith("media:")),
            "s3_refusals": s3_refused,
            "daemon_kills": sum("daemon killed" in event for event in chaos.events),
            "worker_kills": sum("kill -9 of the process" in event for event in chaos.events),
        },
        "runs": len(runs),
        "runs_failed": sum(run.status == DagsterRunStatus.FAILURE for run in runs),
    }
    healed = isinstance(minutes_to_heal, float) and minutes_to_heal <= GOAL_MINUTES_TO_HEAL
    return BenchResult(
        name="chaos",
        setup=f"{count} text-only briefs, {profile} profile{f' ({skipped})' if skipped else ''}; "
        f"{LOST_ANSWER_RATE:.0%} create answers lost, {RATE_LIMITED_RATE:.0%} of API calls 429, media host down "
        f"{plan.media_outage_seconds:.0f} s, S3 down {plan.s3_outage_seconds:.0f} s, 3 daemon kills, 1 run kill",
        figures=result_figures,
        goals=[
            (f"0 lost ({figures['lost']})", figures["lost"] == 0),
            (f"0 duplicate charges ({figures['duplicate_charges']})", figures["duplicate_charges"] == 0),
            (f"0 abandoned ({figures['abandoned']})", figures["abandoned"] == 0),
            (f"every brief stored ({figures['stored']}/{count})", figures["stored"] == count),
            (f"healed within {GOAL_MINUTES_TO_HEAL:.0f} min of the last fault ({minutes_to_heal})", healed),
        ],
        bounds="the store retry's backoff (1, 2, 4 ... min in the full run): a video that failed during an outage "
        "waits out its next step after the outage ends",
    )
