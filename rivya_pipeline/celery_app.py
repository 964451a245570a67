"""The Celery app the warm workers run (`celery -A rivya_pipeline.celery_app worker`): Dagster's own
(`dagster_celery.app`, whose run task CeleryRunLauncher sends), acknowledging a run when it ends.

With Celery's default, a run is acknowledged when it starts, and the broker then hands each busy pool process one
more run that waits in the worker behind the busy one, for as long as that one takes (a store streaming a video),
while other workers sit idle. Acknowledged at its end, a run counts against the prefetch limit (1 per pool
process) while it executes, so a waiting run stays in the broker for the first free process on any machine.
A pool process that dies is still reported as a failed task, not redelivered (`task_reject_on_worker_lost` stays
off): run monitoring fails the run and run retries start a new one.

The result backend (the instance's PostgreSQL) is retried for about ten minutes, not Celery's default of three tries
within ~70 ms: with that default, a worker that took a run's task while the database was unreachable could not
record it as started, failed it outside the run and acknowledged it, and the run waited STARTING for monitoring's
start timeout; a run that ended during the outage never had its end recorded.
"""

from dagster_celery.app import app

app.conf.task_acks_late = True
# Waits of up to 0.5, 1, 2 … 10 s (jittered down), 120 of them: a database outage of about ten minutes.
app.conf.result_backend_always_retry = True
app.conf.result_backend_max_retries = 120
app.conf.result_backend_base_sleep_between_retries_ms = 500
app.conf.result_backend_max_sleep_between_retries_ms = 10_000

__all__ = ["app"]
