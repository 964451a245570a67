"""`pending_generation_tasks`: polls paid tasks until they end, then asks for their videos to be stored.

The ledger's `next_poll_at` is the durable cursor: a tick polls what is due (bounded in count and
time, far under the 60 s tick limit), and whatever it did not reach stays due for the next tick.
Stores are requested from the ledger's store queue, which holds only the videos that are due: a video is due as
soon as its task succeeded, and again after each failed store once its backoff has passed (1, 2, 4 ... minutes,
capped), for as long as its store window lasts (24 h by default; then it leaves the queue and is reported). First
in `store_videos` runs of up to STORE_BATCH_SIZE videos (store_batch.py), keyed by their task ids, so a tick that
dies before its result is saved loses nothing and launches nothing twice. A video that a batch did not store (its
run failed, or died) is then retried alone in `store_video` runs of its partition, each under a new key.

A create that never got its answer (the run died, or gave up on a transient error) would otherwise wait
for a person: once the run that sent it has ended, the sensor requests a generation_task run that re-sends it
under the same Idempotency-Key (Rivya answers with the task it may already have charged), spaced and bounded.
"""

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from dagster import (
    AssetsDefinition,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRecord,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    sensor,
)

from ..ledger import RESEND_WINDOW, StoreRetryPolicy, TaskRecord, TaskTracker
from ..settings import utc_now
from .assets import RESEND_TAG, briefs_partitions, generation_task, stored_video
from .events import poll_observations
from .inputs import TASK_TAG
from .resources import LedgerResource, RivyaResource, VideoStorageResource
from .store_batch import STORE_VIDEOS_JOB, batched_task_ids, in_batches, store_videos, store_videos_run_config

TICK_TIME_BUDGET_SECONDS = 20.0
MAX_POLLS_PER_TICK = 1000
MAX_STORE_REQUESTS_PER_TICK = 200
# How far back the sensor looks for store_videos runs that did not store all their videos.
BATCH_LOOKBACK = timedelta(days=2)
PARTITION_TAG = "dagster/partition"  # the tag Dagster puts on every run of one partition
MAX_RETRIES_TAG = "dagster/max_retries"  # on a run: overrides the instance's run_retries.max_retries
# The pause after a failed re-send run (six of them cover an outage of about an hour), and how long a create waits
# when no run of its partition is known to have sent it: longer than any create can take (the client gives up
# within ~3 min), so a create still in flight is not re-sent.
RESEND_AFTER = timedelta(minutes=10)
MAX_RESEND_ATTEMPTS = 6
MAX_RESEND_REQUESTS_PER_TICK = 50
FAILED = [DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
UNFINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,  # its step may still be sending
]


# One partition per run: a video retried alone, a re-sent create.
store_video_job = define_asset_job(
    "store_video",
    selection=[stored_video],
    partitions_def=briefs_partitions,
    description="Stores one brief's video: a retry of a video that a store_videos batch did not store.",
)
resend_job = define_asset_job(
    "resend_generation_task",
    selection=[generation_task],
    partitions_def=briefs_partitions,
    description="Re-sends one brief's unanswered create under its Idempotency-Key (Rivya answers with its task).",
)


def run_ended_at(record: RunRecord) -> float:
    """When a finished run ended (its last status change where its storage holds no end time: older runs)."""
    return record.end_time or record.update_timestamp.timestamp()


def failed_store_runs(instance: DagsterInstance, task_id: str) -> tuple[int, float | None]:
    """How many runs of this video's own failed, and when the newest of them ended (None: none failed)."""
    records = instance.get_run_records(RunsFilter(tags={TASK_TAG: task_id}, statuses=FAILED))
    return len(records), max(map(run_ended_at, records), default=None)


def runs_asset(run: DagsterRun, asset: AssetsDefinition) -> bool:
    """Whether the run may materialize `asset` (a run without an asset selection, as `materialize` makes, may)."""
    return not run.asset_selection or asset.key in run.asset_selection


def run_in_progress(instance: DagsterInstance, brief_id: str, asset: AssetsDefinition) -> bool:
    """A run of this partition that includes `asset` is under way (say, a launch from the UI)."""
    runs = instance.get_runs(RunsFilter(tags={PARTITION_TAG: brief_id}, statuses=UNFINISHED))
    return any(runs_asset(run, asset) for run in runs)


def store_run_request(record: TaskRecord, failed_attempts: int) -> RunRequest:
    """Keyed by task id and attempt: a run key blocks forever, so a failed store gets a fresh key (the store
    window bounds how many: the ledger stops queueing the video when it runs out).

    This sensor is the one retrier of store runs, whatever ended them (a failed step or a dead worker): the
    instance's run retries are off for them, or both would store the same video at once after a worker died."""
    return RunRequest(
        run_key=f"{record.task_id}:store" + (f":retry{failed_attempts}" if failed_attempts else ""),
        job_name=store_video_job.name,
        partition_key=record.brief_id,
        tags={TASK_TAG: record.accepted_task_id, MAX_RETRIES_TAG: "0"},
    )


def store_batch_request(records: Sequence[TaskRecord]) -> RunRequest:
    """Keyed by the batch's task ids: the same batch is never launched twice."""
    task_ids = [record.accepted_task_id for record in records]
    digest = hashlib.sha256("\n".join(task_ids).encode()).hexdigest()[:16]
    return RunRequest(
        run_key=f"store-batch:{digest}",
        job_name=STORE_VIDEOS_JOB,
        run_config=store_videos_run_config(task_ids),
        tags={MAX_RETRIES_TAG: "0"},
    )


def batched_tasks(instance: DagsterInstance, now: datetime) -> dict[str, bool]:
    """Task id -> whether its store_videos run is still going, for the recent batch runs that are unfinished or
    failed (a batch that succeeded stored all its videos)."""
    runs = instance.get_runs(
        RunsFilter(job_name=STORE_VIDEOS_JOB, statuses=UNFINISHED + FAILED, created_after=now - BATCH_LOOKBACK)
    )
    going: dict[str, bool] = {}
    for run in runs:
        for task_id in batched_task_ids(run.run_config):
            going[task_id] = going.get(task_id, False) or run.status in UNFINISHED
    return going


def store_requests(
    instance: DagsterInstance, tasks: TaskTracker, now: datetime, retry: StoreRetryPolicy
) -> list[RunRequest]:
    """Batches for due videos not tried yet; a run of its own for each due video that a store did not store.

    A run that failed before its store could record anything (launch refused while the broker was down, a worker
    lost) moves no due time in the ledger, so the backoff is also kept from the end of the video's last failed
    run: an outage of the run queue costs a few runs, not one per tick."""
    batched = batched_tasks(instance, now)
    requests, to_batch = [], []
    for record in tasks.due_for_store(now, limit=MAX_STORE_REQUESTS_PER_TICK):
        task_id = record.accepted_task_id
        if batched.get(task_id) or run_in_progress(instance, record.brief_id, stored_video):
            continue
        failed, last_failed_at = failed_store_runs(instance, task_id)
        if last_failed_at is not None and now.timestamp() - last_failed_at < retry.wait_after(failed).total_seconds():
            continue
        if task_id not in batched and not failed and not record.store_attempts:
            to_batch.append(record)
        else:
            requests.append(store_run_request(record, failed))
    requests += [store_batch_request(batch) for batch in in_batches(to_batch)]
    return requests


def sender_has_ended(instance: DagsterInstance, record: TaskRecord, now: datetime) -> bool:
    """No create of this row can still be in flight: every run of its partition that runs generation_task has
    ended, and one of them was going when the row was written (the run that sent it). Without such a run (its
    runs deleted, or sent from elsewhere), RESEND_AFTER from sending stands in for it."""
    sent = record.submitted_at.timestamp()
    sender_ended = False
    for run_record in instance.get_run_records(RunsFilter(tags={PARTITION_TAG: record.brief_id})):
        run = run_record.dagster_run
        if not runs_asset(run, generation_task):
            continue
        if run.status in UNFINISHED:
            return False
        started = run_record.start_time or run_record.create_timestamp.timestamp()
        sender_ended = sender_ended or (started <= sent <= run_ended_at(run_record))
    return sender_ended or now - record.submitted_at >= RESEND_AFTER


def resend_requests(instance: DagsterInstance, tasks: TaskTracker, now: datetime) -> list[RunRequest]:
    """generation_task runs for creates left unanswered, as soon as the run that sent one has ended (an outage
    that failed it is often over by the next tick), then every RESEND_AFTER after a failed attempt, at most
    MAX_RESEND_ATTEMPTS times; within Rivya's idempotency window."""
    requests = []
    unanswered = tasks.unanswered_submits(
        sent_after=now - RESEND_WINDOW, sent_before=now, limit=MAX_RESEND_REQUESTS_PER_TICK
    )
    for record in unanswered:
        latest = tasks.latest_for_brief(record.brief_id)
        if latest is None or latest.idempotency_key != record.idempotency_key:
            continue  # an edited brief was submitted since: the partition's runs are about that one now
        if not sender_has_ended(instance, record, now):
            continue
        failed = instance.get_run_records(RunsFilter(tags={RESEND_TAG: record.idempotency_key}, statuses=FAILED))
        if len(failed) >= MAX_RESEND_ATTEMPTS:
            continue
        last_end = max((run.end_time for run in failed if run.end_time), default=None)
        if last_end is not None and now - datetime.fromtimestamp(last_end, UTC) < RESEND_AFTER:
            continue
        requests.append(
            RunRequest(
                run_key=f"{record.idempotency_key}:resend:{len(failed)}",
                job_name=resend_job.name,
                partition_key=record.brief_id,
                tags={RESEND_TAG: record.idempotency_key},
            )
        )
    return requests


@sensor(
    name="pending_generation_tasks",
    minimum_interval_seconds=5,
    jobs=[store_videos, store_video_job, resend_job],
    default_status=DefaultSensorStatus.RUNNING,
    # Plain text: the sensor page shows descriptions as typed (no Markdown, unlike asset pages).
    description="Polls Rivya for tasks that have no stored video yet (documented cadence, bounded per tick, backing "
    "off while Rivya is down), records status changes, reports failures with their refund and tasks past their "
    "deadline, and stores the videos of succeeded tasks in store_videos batches. A failed store is retried alone "
    "after 1, 2, 4 ... minutes (capped) for 24 h from the task's success, then reported on its partition.",
)
def pending_generation_tasks(
    context: SensorEvaluationContext,
    rivya: RivyaResource,
    ledger: LedgerResource,
    video_storage: VideoStorageResource,
) -> SensorResult | SkipReason:
    tasks = ledger.for_instance(context.instance)
    report = rivya.poller(tasks).poll_due(max_tasks=MAX_POLLS_PER_TICK, time_budget_seconds=TICK_TIME_BUDGET_SECONDS)
    for record, task in report.failed:
        context.log.warning(
            f"task {task.id} (brief {record.brief_id}) failed: {task.error.code if task.error else '?'}; "
            f"{task.refunded_credits} credits refunded"
        )
    for record in report.timed_out:
        context.log.warning(f"task {record.task_id} (brief {record.brief_id}) passed its deadline; no longer polled")
    if report.api_unavailable:
        context.log.warning(
            "Rivya answered no poll this tick (down?): due tasks wait for a later tick, each backing off"
        )
    now = utc_now()
    stores = store_requests(context.instance, tasks, now, video_storage.retry_policy())
    run_requests = stores + resend_requests(context.instance, tasks, now)
    events = poll_observations(report)
    if not run_requests and not events:
        down = "; Rivya answered none (down?), polls back off" if report.api_unavailable else ""
        return SkipReason(f"polled {report.polled} task(s), no status changes{down}")
    return SensorResult(run_requests=run_requests, asset_events=events)
