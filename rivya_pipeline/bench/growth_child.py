"""`python -m rivya_pipeline.bench.growth_child OPERATION [ARGS]`: one operation of `bench growth` in a fresh process.

The environment (DAGSTER_HOME, RIVYA_REQUESTS_PATH, the emulator's URL and key) says which seeded history it meets.
Imports come first and are not measured (a code server or a run process has them loaded before its work starts);
the operation's CPU seconds (all threads) and wall seconds are printed as JSON, with what it found.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dagster import SkipReason, build_schedule_context, build_sensor_context
from dagster_graphql.test.utils import execute_dagster_graphql

from .. import cli
from ..briefs import load_briefs, scan_briefs
from ..definitions import build_definitions, build_resources
from ..defs.assets import stored_video
from ..defs.inputs import TASK_TAG
from ..headless import materialize_brief
from ..instance_setup import open_instance
from ..settings import Settings
from .growth_seed import brief_ids, write_briefs

NEW_BRIEFS = 10
RESULT_PREFIX = "growth-result: "  # a code server started here prints on the same stdout
PARTITION_STATUS_QUERY = """
query PartitionStatus {
  assetNodeOrError(assetKey: {path: ["stored_video"]}) {
    ... on AssetNode {
      partitionStats { numMaterialized numPartitions numFailed }
      assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } }
    }
  }
}
"""


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def measured(figures: dict[str, Any], name: str) -> Iterator[None]:
    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    figures[f"{name}_cpu_s"] = round(_cpu_seconds() - cpu, 4)
    figures[f"{name}_wall_s"] = round(time.perf_counter() - wall, 4)


def discovery(settings: Settings, figures: dict[str, Any]) -> None:
    """Three ticks of one code server: its first (cold caches), one with nothing new, one with NEW_BRIEFS new."""
    repository = build_definitions(settings).get_repository_def()
    schedule = repository.get_schedule_def("brief_discovery")
    with open_instance(Path(settings_home())) as instance:

        def tick() -> int:
            with build_schedule_context(
                instance=instance,
                instance_ref=instance.get_ref(),
                resources=build_resources(settings),
                scheduled_execution_time=datetime.now(UTC),
                repository_def=repository,
            ) as context:
                result = schedule.evaluate_tick(context)
            return len(result.run_requests or []) if not isinstance(result, SkipReason) else 0

        with measured(figures, "discovery_first_tick"):
            tick()
        with measured(figures, "discovery_nothing_new"):
            figures["nothing_new_requests"] = tick()
        with measured(figures, "discovery_floor_folder_stat"):  # its reading of an unchanged folder alone
            scan_briefs(settings.requests_path)
        new = brief_ids(NEW_BRIEFS, prefix="new")
        write_briefs(settings.requests_path / "new", new, [])
        with measured(figures, "discovery_10_new"):
            figures["new_requests"] = tick()


def lookups(settings: Settings, figures: dict[str, Any], brief_id: str) -> None:
    """A run process's three readings of its brief (its three steps' inputs), through the ledger's file index."""
    resources = build_resources(settings)
    with open_instance(Path(settings_home())) as instance:
        with measured(figures, "lookups"):
            index = resources["ledger"].for_instance(instance)
            for _ in range(3):
                found = resources["briefs"].load(brief_id, index)
        figures["found"] = found.id == brief_id


def sensor(settings: Settings, figures: dict[str, Any]) -> None:
    definitions = build_definitions(settings)
    evaluation = definitions.get_repository_def().get_sensor_def("pending_generation_tasks")
    with open_instance(Path(settings_home())) as instance:
        with (
            measured(figures, "sensor_tick"),
            build_sensor_context(
                instance=instance,
                instance_ref=instance.get_ref(),
                resources=build_resources(settings),
                definitions=definitions,
            ) as context,
        ):
            result = evaluation.evaluate_tick(context)
        figures["store_requests"] = len(result.run_requests or [])


def command(figures: dict[str, Any], name: str, argv: list[str]) -> None:
    """A CLI command as a person runs it, its output kept (its size is reported, not printed)."""
    out = io.StringIO()
    with measured(figures, name), contextlib.redirect_stdout(out):
        figures[f"{name}_exit"] = cli.main(argv)
    figures[f"{name}_output_kb"] = round(len(out.getvalue()) / 1024, 1)


def partition_status(settings: Settings, figures: dict[str, Any]) -> None:
    """The UI's query for stored_video's partitions (as the asset page asks), warm, then after one partition."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget

    target = ModuleTarget(
        module_name="rivya_pipeline.definitions", attribute="defs", working_directory=None, location_name="rivya"
    )
    with open_instance(Path(settings_home())) as instance:
        with WorkspaceProcessContext(instance, target) as process_context:

            def query() -> dict[str, Any]:
                result = execute_dagster_graphql(process_context.create_request_context(), PARTITION_STATUS_QUERY)
                return result.data["assetNodeOrError"]["partitionStats"]

            with measured(figures, "ui_partition_status_first"):
                query()
            with measured(figures, "ui_partition_status_warm"):
                stats = query()
            instance.add_dynamic_partitions("briefs", ["added-one"])
            with measured(figures, "ui_partition_status_after_add"):
                after = query()
        figures["ui_partitions"] = [stats["numPartitions"], after["numPartitions"]]
        figures["ui_materialized"] = stats["numMaterialized"]


def store_again(settings: Settings, figures: dict[str, Any], brief_id: str, task_id: str) -> None:
    """A run of one partition's stored_video (a retry, a click in the UI), for its event-log bytes."""
    with open_instance(Path(settings_home())) as instance:
        result = materialize_brief(
            [stored_video], brief_id, instance=instance, resources=build_resources(settings), tags={TASK_TAG: task_id}
        )
    figures["run_id"] = result.run_id


def folder_only(settings: Settings, figures: dict[str, Any]) -> None:
    """Discovery's reading of the folder alone: the first, then one with nothing changed."""
    with measured(figures, "scan_first"):
        found, _ = scan_briefs(settings.requests_path)
    with measured(figures, "scan_nothing_new"):
        again, _ = scan_briefs(settings.requests_path)
    figures["briefs"] = [len(found), len(again)]


def validation(settings: Settings, figures: dict[str, Any]) -> None:
    """`run`'s floor: a fresh process validating every brief of the folder, as `run` must before it spends."""
    with measured(figures, "run_floor_validation"):
        load_briefs(settings.requests_path)


def settings_home() -> str:
    return os.environ["DAGSTER_HOME"]


OPERATIONS: dict[str, Callable[..., None]] = {
    "discovery": discovery,
    "lookups": lookups,
    "sensor": sensor,
    "partition_status": partition_status,
    "folder": folder_only,
    "validation": validation,
    "store_again": store_again,
}


def main(argv: list[str]) -> None:
    settings = Settings.from_env()
    figures: dict[str, Any] = {}
    operation, args = argv[0], argv[1:]
    if operation in ("run", "report"):
        command(figures, operation, [operation, "--json", *args])
    else:
        OPERATIONS[operation](settings, figures, *args)
    print(RESULT_PREFIX + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
