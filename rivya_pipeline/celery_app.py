"""The Celery app the warm workers run (`celery -A rivya_pipeline.celery_app worker`): Dagster's own
(`dagster_celery.app`, whose run task CeleryRunLauncher sends), acknowledging a run when it ends.

With Celery's default, a run is acknowledged when it starts, and the broker then hands each busy pool process one
more run that waits in the worker behind the busy one, for as long as that one takes (a store streaming a video),
while other workers sit idle. Acknowledged at its end, a run counts against the prefetch limit (1 per pool
process) while it executes, so a waiting run stays in the broker for the first free process on any machine.
A pool process that dies is still reported as a failed task, not redelivered (`task_reject_on_worker_lost` stays
off): run monitoring fails the run and run retries start a new one.
"""

from dagster_celery.app import app

app.conf.task_acks_late = True

__all__ = ["app"]
