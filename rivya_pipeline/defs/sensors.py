"""`pending_generation_tasks`: polls paid tasks until they end, then asks for their videos to be stored.

The ledger's `next_poll_at` is the durable cursor: a tick polls what is due (bounded in count and
time, far under the 60 s tick limit), and whatever it did not reach stays due for the next tick.
Store runs are requested from the ledger's "succeeded, not stored" rows on every tick, keyed by task
id, so a tick that dies before its result is saved loses nothing and launches nothing twice; a store
run that failed is requested again under a new key, up to three times.
"""


from dagster import (
    AssetObservation,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from ..ledger import TaskRecord
from ..polling import PollReport
from .assets import TASK_TAG, generation_task_observation, stored_video
from .resources import CreditLimitsResource, RivyaResource

TICK_TIME_BUDGET_SECONDS = 20.0
MAX_POLLS_PER_TICK = 1000
MAX_STORE_REQUESTS_PER_TICK = 200
PARTITION_TAG = "dagster/partition"  # the tag Dagster puts on every run of one partition
MAX_STORE_ATTEMPTS = 3  # storing is free; after 3 failed runs a person looks (the runs say why)


def failed_store_runs(instance: DagsterInstance, task_id: str) -> int:
    failed = [DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
    return instance.get_runs_count(RunsFilter(tags={TASK_TAG: task_id}, statuses=failed))


def store_in_progress(instance: DagsterInstance, brief_id: str) -> bool:
    """A run of this partition that includes stored_video is under way (say, a launch from the UI)."""
    unfinished = [
        DagsterRunStatus.QUEUED,
        DagsterRunStatus.NOT_STARTED,
        DagsterRunStatus.STARTING,
        DagsterRunStatus.STARTED,
    ]
    runs = instance.get_runs(RunsFilter(tags={PARTITION_TAG: brief_id}, statuses=unfinished))
    return any(run.asset_selection is None or stored_video.key in run.asset_selection for run in runs)


def store_run_request(record: TaskRecord, failed_attempts: int) -> RunRequest:
    """Keyed by task id and attempt: a run key blocks forever, so a failed store gets a fresh key (bounded)."""
    return RunRequest(
        run_key=f"{record.task_id}:store" + (f":retry{failed_attempts}" if failed_attempts else ""),
        partition_key=record.brief_id,
        asset_selection=[stored_video.key],
        tags={TASK_TAG: record.task_id},
    )


def task_observations(report: PollReport) -> list[AssetObservation]:
    """Status changes, timeouts and lost tasks, recorded on the generation_task partition."""
    events = []
    for record, task in report.changed:
        events.append(generation_task_observation(record.brief_id, task))
    for record, status in [(r, "timed_out") for r in report.timed_out] + [(r, "not_found") for r in report.lost]:
        events.append(
            AssetObservation(
                "generation_task",
                partition=record.brief_id,
                metadata={"task_id": record.task_id, "status": status, "reserved_credits": record.reserved_credits},
            )
        )
    return events


@sensor(
    name="pending_generation_tasks",
    minimum_interval_seconds=5,
    asset_selection=[stored_video],
    default_status=DefaultSensorStatus.RUNNING,
    # Plain text: the sensor page shows descriptions as typed (no Markdown, unlike asset pages).
    description="Polls Rivya for tasks that have no stored video yet (documented cadence, bounded per tick), "
    "records status changes, reports failures with their refund and tasks past their deadline, and requests a "
    "stored_video run for each succeeded task.",
)
def pending_generation_tasks(
    context: SensorEvaluationContext, rivya: RivyaResource, credit_limits: CreditLimitsResource
) -> SensorResult | SkipReason:
    ledger = credit_limits.ledger(context.instance)
    report = rivya.poller(ledger).poll_due(max_tasks=MAX_POLLS_PER_TICK, time_budget_seconds=TICK_TIME_BUDGET_SECONDS)
    for record, task in report.failed:
        context.log.warning(
            f"task {task.id} (brief {record.brief_id}) failed: {task.error.code if task.error else '?'}; "
            f"{task.refunded_credits} credits refunded"
        )
    for record in report.timed_out:
        context.log.warning(f"task {record.task_id} (brief {record.brief_id}) passed its deadline; no longer polled")
    run_requests = []
    for record in ledger.succeeded_unstored(limit=MAX_STORE_REQUESTS_PER_TICK):
        if store_in_progress(context.instance, record.brief_id):
            continue
        failed = failed_store_runs(context.instance, record.task_id)
        if failed < MAX_STORE_ATTEMPTS:
            run_requests.append(store_run_request(record, failed))
    events = task_observations(report)
    if not run_requests and not events:
        return SkipReason(f"polled {report.polled} task(s), no status changes")
    return SensorResult(run_requests=run_requests, asset_events=events)
