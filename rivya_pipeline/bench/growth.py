"""`bench growth`: what each recurring operation costs after a year of briefs, at two sizes of history.

Each size N gets a fresh instance, ledger and folder seeded with N briefs (one file each, a fifth with one of 50
reference JPEGs of about 1 MB), N partitions, N submit runs and N/10 store batches with their real tags, a
`stored_video` materialization per partition (a real one's metadata, pictures included) with seven check
evaluations (3% failing), and a stored ledger row per brief spread over 365 days (`growth_seed`). Then each
operation runs in a process of its own (`growth_child`), as a code server, a run or a person meets it, and its
CPU and wall seconds are compared across sizes: a ratio t(big)/t(small) of about 1 means the operation costs what
its new work costs, about big/small (10) that it grows with history.

Also: the event-log bytes one stored video adds, on the batch path (the sensor's) and a lone run's (the UI's,
a retry), from a real store on the emulator; the ledger's and the instance's bytes per seeded video; and the
folder's reading alone at 100,000 briefs (20,000 with `--quick`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dagster import AssetCheckEvaluation, AssetRecordsFilter, DagsterEventType, DagsterInstance, RunsFilter
from dagster._serdes import serialize_value

from ..defs.resources import default_ledger_url
from ..defs.store_batch import STORE_VIDEOS_JOB
from ..instance_setup import open_instance, write_default_config
from ..ledger import Ledger
from .common import BenchResult, Figure, create_tasks, insert_ledger_rows, seed_pending
from .e2e import timed_command
from .growth_child import RESULT_PREFIX
from .growth_seed import STORED_VIDEO, Template, brief_ids, seed, write_briefs, write_reference_images
from .scale import GENERATION
from .stack import BenchStack

SIZES = (1000, 10000)
QUICK_SIZES = (200, 2000)
FOLDER_ONLY = 100_000
QUICK_FOLDER_ONLY = 20_000
TEMPLATE_BRIEFS = 10  # one store batch
DUE_POLLS, DUE_STORES = 20, 10
GOALS = {  # figure -> the largest ratio t(big)/t(small) that still counts as "costs what the new work costs"
    "discovery_nothing_new_cpu_s": 2.0,
    "lookups_cpu_s": 1.5,
    "sensor_tick_cpu_s": 1.5,
    "run_cpu_s": 3.0,
    "report_cpu_s": 1.5,
}
UI_AFTER_ADD_GOAL_S = 2.0
EVENT_LOG_GOAL_KB = 50.0
NOTHING_NEW_GOAL_CPU_S, FOLDER_ONLY_GOAL_S = 1.0, 10.0
LOOKUPS_GOAL_S = 0.05


def child(operation: str, env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "rivya_pipeline.bench.growth_child", operation, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"growth child {operation} exited {done.returncode}:\n{done.stderr[-3000:]}")
    (line,) = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(line.removeprefix(RESULT_PREFIX))


def new_home(root: Path) -> Path:
    home = root / "home"
    home.mkdir(parents=True)
    write_default_config(home)
    return home


# What a stored video itself puts in the event log; every other event of a run is Dagster's bookkeeping of the run,
# its step and its outputs (in a run of the asset: a planned event and a step output per check as well).
RECORD_EVENTS = frozenset({DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_CHECK_EVALUATION})


def event_bytes(instance: DagsterInstance, run_id: str, only: frozenset[DagsterEventType] | None = None) -> int:
    return sum(
        len(serialize_value(entry))
        for entry in instance.all_logs(run_id)
        if only is None or (entry.dagster_event is not None and entry.dagster_event.event_type in only)
    )


def store_for_real(stack: BenchStack, root: Path) -> tuple[Template, dict[str, float]]:
    """TEMPLATE_BRIEFS briefs bought and stored on the emulator by `rivya-pipeline run` (in store batches), then one
    of them stored again in a run of its partition: a real materialization to copy, and the event-log bytes per
    video of each path."""
    stack.configure(**GENERATION)
    home, folder = new_home(root), root / "briefs"
    write_briefs(folder, brief_ids(TEMPLATE_BRIEFS, prefix="real"), [])
    env = stack.pipeline_env() | {"DAGSTER_HOME": str(home), "RIVYA_REQUESTS_PATH": str(folder)}
    timed_command([sys.executable, "-m", "rivya_pipeline.cli", "run", "--json"], env=env)
    with open_instance(home) as instance:
        batches = instance.get_runs(RunsFilter(job_name=STORE_VIDEOS_JOB))  # as the tasks ended: one or more
        batch_kb = sum(event_bytes(instance, batch.run_id) for batch in batches) / 1024 / TEMPLATE_BRIEFS
        (latest,) = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=STORED_VIDEO, asset_partitions=brief_ids(1, "real")), limit=1
        ).records
        materialization = latest.asset_materialization
        if materialization is None:
            raise RuntimeError("the real store left no stored_video materialization")
        checks = [
            entry.dagster_event.event_specific_data
            for entry in instance.all_logs(latest.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
            if entry.dagster_event
            and isinstance(entry.dagster_event.event_specific_data, AssetCheckEvaluation)
            and entry.dagster_event.event_specific_data.partition == materialization.partition
        ]
        ledger = Ledger(default_ledger_url(instance))
        record = ledger.latest_for_brief(str(materialization.partition))
        ledger.close()
        if record is None:
            raise RuntimeError("the real store left no ledger row")
        task_id = record.accepted_task_id
    lone_run_id = child("store_again", env, str(materialization.partition), task_id)["run_id"]
    with open_instance(home) as instance:
        lone_kb = event_bytes(instance, lone_run_id) / 1024
        lone_record_kb = event_bytes(instance, lone_run_id, RECORD_EVENTS) / 1024
    if len(checks) != 7:
        raise RuntimeError(f"the real store has {len(checks)} check evaluations for one video, not 7")
    figures = {
        "event_log_kb_per_video_batch": round(batch_kb, 1),
        "event_log_kb_per_video_lone_run": round(lone_kb, 1),
        # the floor beside it: the materialization and the seven evaluations alone, the rest being Dagster's
        "event_log_kb_lone_run_video_record": round(lone_record_kb, 1),
    }
    return Template(dict(materialization.metadata), checks), figures


def seed_sensor_work(stack: BenchStack, ledger_url: str) -> None:
    """DUE_POLLS tasks due for a poll (real tasks on the emulator) and DUE_STORES succeeded videos due to be stored."""
    seed_pending(ledger_url, create_tasks(stack.client(), DUE_POLLS, "growth"), due_since=timedelta(seconds=5)).close()
    now = datetime.now(UTC)
    rows = [
        {
            "idempotency_key": f"growth-store-{index}",
            "brief_id": f"growth-store-{index}",
            "run_id": "growth",
            "model": "kling-3-0",
            "price_credits": 90,
            "body": "{}",
            "task_id": f"growth-store-task-{index}",
            "status": "succeeded",
            "reserved_credits": 90,
            "final_credits": 90,
            "submitted_at": now - timedelta(minutes=5),
            "updated_at": now - timedelta(minutes=1),
            "store_queued_at": now - timedelta(minutes=1),
            "store_due_at": now - timedelta(minutes=1),
        }
        for index in range(DUE_STORES)
    ]
    insert_ledger_rows(ledger_url, rows)


def tree_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def measure_size(stack: BenchStack, root: Path, count: int, template: Template) -> dict[str, Any]:
    home, folder = new_home(root), root / "briefs"
    with open_instance(home) as instance:
        ledger_url = default_ledger_url(instance)
        seeded = seed(instance, ledger_url, folder, count, template)
        partitions = len(instance.get_dynamic_partitions("briefs"))
        materialized = len(instance.get_materialized_partitions(STORED_VIDEO))
        runs = instance.get_runs_count()
    expected_runs = count + -(-count // 10)
    if (partitions, materialized, runs) != (count, count, expected_runs):
        raise RuntimeError(f"seed of {count}: {partitions} partitions, {materialized} materialized, {runs} runs")
    figures: dict[str, Any] = {"seeded_events": seeded["events"]}
    ledger_bytes = Path(ledger_url.removeprefix("sqlite:///")).stat().st_size
    figures["instance_kb_per_video"] = round((tree_bytes(home) - ledger_bytes) / 1024 / count, 1)
    figures["ledger_kb_per_video"] = round(ledger_bytes / 1024 / count, 2)
    stack.configure(**GENERATION)
    env = stack.pipeline_env() | {"DAGSTER_HOME": str(home), "RIVYA_REQUESTS_PATH": str(folder)}
    figures |= child("discovery", env)
    shutil.rmtree(folder / "new")  # `run` below meets the all-stored folder
    figures |= child("lookups", env, brief_ids(count)[count // 2 // 5 * 5])
    figures |= child("run", env, "--requests", str(folder))
    figures |= child("validation", env)
    figures |= child("report", env)
    seed_sensor_work(stack, ledger_url)
    figures |= child("sensor", env)
    figures |= child("partition_status", env)
    return figures


def measure_folder(root: Path, count: int) -> dict[str, Any]:
    folder = root / "briefs"
    write_briefs(folder, brief_ids(count), write_reference_images(folder))
    env = dict(os.environ) | {"RIVYA_REQUESTS_PATH": str(folder), "DAGSTER_HOME": str(new_home(root))}
    return child("folder", env)


def at_most(figure: str, value: float, limit: float) -> tuple[str, bool]:
    return f"{figure} <= {limit} ({value})", value <= limit


def ratio(big: float, small: float) -> float:
    return round(big / small, 2) if small > 0 else float("inf")


def run(stack: BenchStack, quick: bool, sizes: Sequence[int] | None = None) -> BenchResult:
    small, big = sizes or (QUICK_SIZES if quick else SIZES)
    folder_only = QUICK_FOLDER_ONLY if quick else FOLDER_ONLY
    with tempfile.TemporaryDirectory(prefix="rivya-bench-growth-") as tmp:
        template, footprint = store_for_real(stack, Path(tmp) / "real")
        at_small = measure_size(stack, Path(tmp) / str(small), small, template)
        at_big = measure_size(stack, Path(tmp) / str(big), big, template)
        folder = measure_folder(Path(tmp) / "folder", folder_only)
    figures: dict[str, Figure | dict[str, Figure]] = {**footprint}
    timed = [key for key in at_big if key.endswith(("_cpu_s", "_wall_s"))]
    for key in timed:
        figures[key] = {str(small): at_small[key], str(big): at_big[key], "ratio": ratio(at_big[key], at_small[key])}
    for key in ("instance_kb_per_video", "ledger_kb_per_video", "seeded_events"):
        figures[key] = {str(small): at_small[key], str(big): at_big[key]}
    figures[f"folder_only_{folder_only}"] = {k: v for k, v in folder.items() if k.endswith("_s")}
    goals = [
        (f"{key} ratio <= {limit} ({figures[key]['ratio']})", figures[key]["ratio"] <= limit)  # type: ignore[index]
        for key, limit in GOALS.items()
    ]
    goals += [
        at_most(
            f"discovery with nothing new, CPU s at {big}", at_big["discovery_nothing_new_cpu_s"], NOTHING_NEW_GOAL_CPU_S
        ),
        at_most(
            f"the folder read with nothing new, CPU s at {folder_only}",
            folder["scan_nothing_new_cpu_s"],
            FOLDER_ONLY_GOAL_S,
        ),
        at_most(f"one run's lookups, s at {big}", at_big["lookups_wall_s"], LOOKUPS_GOAL_S),
        at_most(
            f"UI partition status after one add, s at {big}",
            at_big["ui_partition_status_after_add_wall_s"],
            UI_AFTER_ADD_GOAL_S,
        ),
        at_most(
            "event log KB per stored video, batch path", footprint["event_log_kb_per_video_batch"], EVENT_LOG_GOAL_KB
        ),
        at_most(
            "event log KB per stored video, lone run", footprint["event_log_kb_per_video_lone_run"], EVENT_LOG_GOAL_KB
        ),
        (
            "each size's operations found what was seeded (nothing new, 10 new, the brief, run and report exit 0, "
            f"{DUE_STORES} stores asked in one batch)",
            all(
                at["nothing_new_requests"] == 0
                and at["new_requests"] == 10
                and at["found"]
                and at["run_exit"] == 0
                and at["report_exit"] == 0
                and at["store_requests"] >= 1
                for at in (at_small, at_big)
            ),
        ),
    ]
    return BenchResult(
        name="growth",
        setup=f"a year of history at {small} and {big} briefs (SQLite instance and ledger), each operation in a "
        f"child process; the folder alone at {folder_only}",
        figures=figures,
        goals=goals,
        bounds="the lone run's event log: Dagster's bookkeeping of a run of an asset with seven checks (a planned "
        "event and a step output per check, the run's and the step's events) beside the video's own record "
        "(event_log_kb_lone_run_video_record: its materialization and seven evaluations); "
        "discovery with nothing new: listing and stat-ing every file of the folder "
        "(discovery_floor_folder_stat, O(files) without a change feed from the file system); run: reading and "
        "validating the whole folder in a fresh process before anything is spent (run_floor_validation: ids are "
        "unique across it) and the QC verdict of each brief's video (Dagster's latest check execution per "
        "partition)",
    )
