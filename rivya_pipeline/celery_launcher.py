"""The warm-worker profile's run launcher: dagster-celery's CeleryRunLauncher, with one health answer corrected.

A run executing while PostgreSQL is unreachable loses its end event (Dagster logs that it could not write it and
goes on), while its worker stores the task's end in the result backend once the database is back. CeleryRunLauncher
then reports the worker as SUCCESS, run monitoring leaves a SUCCESS worker alone, and the run stays STARTED until
max_runtime_seconds (an hour), holding its brief's video. Here a task that ended under a run still unfinished is a
failed worker: monitoring reads the run again first (a run that just wrote its end is left alone), fails it, and
run retries start it again (a paid submit re-attaches through the ledger; a store is retried from the store queue).
"""

from __future__ import annotations

from dagster import DagsterRun
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster_celery.launcher import CeleryRunLauncher


class MonitoredCeleryRunLauncher(CeleryRunLauncher):
    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        health = super().check_run_worker_health(run)
        if health.status == WorkerStatus.SUCCESS:
            return CheckRunHealthResult(
                WorkerStatus.FAILED,
                "its Celery task ended, but the run's end was never recorded (lost with a connection)",
            )
        return health
