"""The same definitions on another of Dagster's executors (Kubernetes pods, Celery workers): see deploy/README.md.

Nothing here executes anything: the executor is Dagster's own (dagster-k8s, dagster-celery), configured from
the `execution: config:` block of a YAML file, the format `dagster-celery worker start -y` reads too, so the
runs and the workers cannot disagree about the broker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from dagster import Definitions, ExecutorDefinition

from .definitions import build_definitions


def executor_config(path: str | Path) -> dict[str, Any]:
    """The `execution: config:` block of a run-config YAML file ({} when the file sets none)."""
    loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return (loaded.get("execution") or {}).get("config") or {}


def with_executor(executor: ExecutorDefinition, config_path: str | Path) -> Definitions:
    """The pipeline's definitions, every job run by `executor` configured from `config_path`."""
    return build_definitions(executor=executor.configured(executor_config(config_path)))
