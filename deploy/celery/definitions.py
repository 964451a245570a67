"""Code location for Celery: steps run on `dagster-celery` workers (`dagster api grpc -f deploy/celery/definitions.py`).

The executor reads the same celery.yaml the workers are started with, so both sides agree on the broker.
"""

from pathlib import Path

from dagster_celery import celery_executor

from rivya_pipeline.scaleout import with_executor

defs = with_executor(celery_executor, Path(__file__).with_name("celery.yaml"))
