"""The default profile's run launcher: Dagster's DefaultRunLauncher, which run monitoring can ask about a run.

DefaultRunLauncher starts each run as a process of the code server that loaded its job, and has no worker health
check: a run whose process died with its code server (the daemon's node drained, `kill -9` of `dagster dev`) stays
STARTED for good, holding its brief's video (the sensor never stores what a run is still storing) and, for a paid
submit killed before its create, leaving the brief never bought. This launcher asks the run's code server, over
the gRPC address Dagster tagged the run with, whether it still executes the run; run monitoring fails a run whose
server is gone or no longer knows it, and run retries (or discovery's relaunch) take it from there.
"""

from __future__ import annotations

import json

import grpc
from dagster import DagsterRun, DefaultRunLauncher
from dagster._core.errors import DagsterUserCodeUnreachableError
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG
from dagster._grpc.client import DagsterGrpcClient
from dagster._grpc.types import GetCurrentRunsResult
from dagster._serdes import deserialize_value


class MonitoredRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher with `check_run_worker_health`: RUNNING while the run's code server lists the run,
    FAILED once that server is unreachable (gone with its runs) or no longer lists it."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        address = run.tags.get(GRPC_INFO_TAG)
        if address is None:
            # Not started by a launcher (an in-process run: `rivya-pipeline run`, a test): its own process owns it.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "not launched through a code server")
        info = json.loads(address)
        client = DagsterGrpcClient(
            port=info.get("port"),
            socket=info.get("socket"),
            host=info.get("host", "localhost"),
            use_ssl=bool(info.get("use_ssl", False)),
        )
        try:
            current = deserialize_value(client.get_current_runs(), GetCurrentRunsResult)
        except DagsterUserCodeUnreachableError as exc:
            cause = exc.__cause__
            if isinstance(cause, grpc.RpcError) and cause.code() == grpc.StatusCode.UNAVAILABLE:
                return CheckRunHealthResult(WorkerStatus.FAILED, f"its code server ({address}) is gone")
            # Slow or busy is not dead: monitoring fails a run on anything but RUNNING or SUCCESS.
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"its code server did not answer: {exc}")
        if run.run_id in current.current_runs:
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        # Monitoring reads the run again before it fails it, so a run that just ended is left alone.
        return CheckRunHealthResult(WorkerStatus.FAILED, f"its code server ({address}) no longer executes it")
