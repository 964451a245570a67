"""`python -m rivya_pipeline.bench.dagster_floor RUNS`: the least Dagster itself costs `bench e2e`, where it runs.

RUNS in-process runs of an asset that does nothing, one partition each, on a fresh SQLite instance in a temporary
home, started as a process of its own like both sides of the benchmark. The pipeline's runs have more steps,
checks and events, so this is a lower bound: no pipeline that keeps a Dagster run per brief and per step
boundary it isolates (the paid submit, the store) can be faster than it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from dagster import DagsterInstance, DynamicPartitionsDefinition, asset, materialize

from ..headless import QUIET_LOGS

INSTANCE_YAML = "telemetry:\n  enabled: false\n"
PARTITIONS = "floor"
partitions = DynamicPartitionsDefinition(name=PARTITIONS)


@asset(partitions_def=partitions)
def nothing() -> None:
    """Does nothing: a run of it is Dagster's own cost (run record, plan, events)."""


def main(runs: int) -> None:
    keys = [f"run-{index}" for index in range(runs)]
    with tempfile.TemporaryDirectory(prefix="rivya-bench-floor-") as home:
        Path(home, "dagster.yaml").write_text(INSTANCE_YAML)
        with DagsterInstance.from_config(home) as instance:
            instance.add_dynamic_partitions(PARTITIONS, keys)
            for key in keys:
                materialize([nothing], partition_key=key, instance=instance, run_config=QUIET_LOGS)


if __name__ == "__main__":
    main(int(sys.argv[1]))
