"""Code location for Kubernetes: every step of a run in its own pod (`dagster api grpc -f deploy/k8s/definitions.py`).

Only needed for pod-per-step isolation; with the plain `-m rivya_pipeline.definitions` the K8sRunLauncher still
gives every run its own pod (deploy/README.md says which to pick).
"""

from pathlib import Path

from dagster_k8s import k8s_job_executor

from rivya_pipeline.scaleout import with_executor

defs = with_executor(k8s_job_executor, Path(__file__).with_name("executor.yaml"))
