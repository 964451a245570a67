"""The deployments in deploy/ are config Dagster loads: instance profiles and the Kubernetes code location.

Everything is checked with the installed dagster-k8s and dagster-celery and Dagster's own config validation (the
same checks Dagster runs before it builds a storage, a run launcher or an executor), so none of it needs a cluster, a
broker or a database. The Celery profile is also executed, on this machine's broker: test_celery_workers.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from dagster import Definitions, validate_run_config
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.ref import InstanceRef
from dagster._serdes import ConfigurableClassData
from dagster_k8s import K8sRunLauncher

from rivya_pipeline.celery_launcher import MonitoredCeleryRunLauncher
from rivya_pipeline.settings import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
PROFILES = {"production": DEPLOY / "dagster.yaml", "k8s": DEPLOY / "k8s" / "dagster.yaml"}
PROFILES["celery"] = DEPLOY / "celery" / "dagster.yaml"
# The variables the profiles read; placeholders, since nothing here connects.
DEPLOYMENT_ENV = {
    "DAGSTER_PG_HOST": "postgres.example.internal",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_USER": "dagster",
    "DAGSTER_PG_PASSWORD": "placeholder",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_CELERY_BROKER_URL": "pyamqp://guest:guest@rabbitmq.example.internal:5672//",
    "DAGSTER_CELERY_BACKEND_URL": "db+postgresql+psycopg2://dagster:placeholder@postgres.example.internal:5432/dagster",
    "RIVYA_API_KEY": "rvya_sk_placeholder",  # the runs' resources read it when their config is resolved
}
# A kubeconfig naming a server that nothing listens on: building the launcher reads it, never connects.
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: not-a-token}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


@pytest.fixture(autouse=True)
def deployment_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in DEPLOYMENT_ENV.items():
        monkeypatch.setenv(name, value)


def instance_ref(profile: Path, tmp_path: Path) -> InstanceRef:
    """The profile as $DAGSTER_HOME/dagster.yaml, read and schema-checked by Dagster (InstanceRef.from_dir)."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(profile, home / "dagster.yaml")
    return InstanceRef.from_dir(str(home))


def validated(class_data: ConfigurableClassData) -> tuple[type, dict]:
    """The class a profile names and its config processed by that class's own schema (what Dagster checks right
    before constructing it): a typo or a wrong type in any field fails here."""
    klass = getattr(importlib.import_module(class_data.module_name), class_data.class_name)
    result = process_config(resolve_to_config_type(klass.config_type()), class_data.config_dict)
    assert result.success, [error.message for error in result.errors]
    return klass, result.value


def import_file(path: Path) -> ModuleType:
    """A Python file imported by its path, as `dagster api grpc -f PATH` (and a Celery worker's config) is."""
    spec = importlib.util.spec_from_file_location(f"imported_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loaded_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_is_an_instance_config_dagster_accepts_class_by_class(name, tmp_path):
    ref = instance_ref(PROFILES[name], tmp_path)

    parts = {
        "storage": ref.storage_data,
        "run_coordinator": ref.run_coordinator_data,
        "run_launcher": ref.run_launcher_data,
    }
    classes = {part: validated(data)[0].__name__ for part, data in parts.items()}
    launcher = {"production": "MonitoredRunLauncher", "celery": "MonitoredCeleryRunLauncher", "k8s": "K8sRunLauncher"}[
        name
    ]
    storage = "PooledPostgresStorage" if name == "celery" else "DagsterPostgresStorage"  # a subclass: see that one
    assert classes == {
        "storage": storage,
        "run_coordinator": "QueuedRunCoordinator",
        "run_launcher": launcher,
    }
    settings = ref.settings
    assert settings["run_retries"] == {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False}
    assert settings["concurrency"]["pools"] == {"default_limit": 4}


def test_k8s_profile_is_the_production_profile_with_its_run_launcher():
    production, profile = loaded_yaml(PROFILES["production"]), loaded_yaml(PROFILES["k8s"])

    assert {k: v for k, v in profile.items() if k != "run_launcher"} == {
        k: v for k, v in production.items() if k != "run_launcher"
    }


def test_celery_profile_is_the_production_profile_with_its_launcher_and_dead_worker_settings():
    production, profile = loaded_yaml(PROFILES["production"]), loaded_yaml(PROFILES["celery"])

    unchanged = {k: v for k, v in profile.items() if k not in ("storage", "run_launcher", "run_monitoring")}
    assert unchanged == {k: v for k, v in production.items() if k not in ("storage", "run_launcher", "run_monitoring")}
    # the same PostgreSQL storage and config, on pooled connections (rivya_pipeline/pooled_postgres.py)
    assert profile["storage"]["custom"] == {
        "module": "rivya_pipeline.pooled_postgres",
        "class": "PooledPostgresStorage",
        "config": production["storage"]["postgres"],
    }
    monitoring = profile["run_monitoring"]
    assert {k: monitoring[k] for k in production["run_monitoring"] if k != "poll_interval_seconds"} == {
        k: v for k, v in production["run_monitoring"].items() if k != "poll_interval_seconds"
    }
    assert monitoring["max_resume_run_attempts"] == 0  # the launcher's resume task cannot run (see the profile)
    assert monitoring["free_slots_after_run_end_seconds"] > 0  # a killed paid submit gives its pool slot back


def test_celery_run_launcher_is_built_from_the_profile_with_a_backend_every_process_can_read(tmp_path):
    klass, config = validated(instance_ref(PROFILES["celery"], tmp_path).run_launcher_data)

    launcher = klass.from_config_value(None, config)  # builds the Celery app; connects to nothing

    assert isinstance(launcher, MonitoredCeleryRunLauncher)
    assert launcher.broker == DEPLOYMENT_ENV["DAGSTER_CELERY_BROKER_URL"]
    assert launcher.backend == DEPLOYMENT_ENV["DAGSTER_CELERY_BACKEND_URL"]
    assert launcher.default_queue == "dagster"
    assert launcher.config_source["worker_prefetch_multiplier"] == 1


def test_k8s_run_launcher_is_built_from_the_profile_without_a_cluster(tmp_path):
    klass, config = validated(instance_ref(PROFILES["k8s"], tmp_path).run_launcher_data)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG, encoding="utf-8")

    # Only where to find the cluster changes (the profile says in-cluster); every other value is the profile's.
    outside_the_cluster = {"load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    launcher = klass.from_config_value(None, config | outside_the_cluster)

    assert isinstance(launcher, K8sRunLauncher)
    assert (launcher.job_namespace, launcher.instance_config_map) == ("rivya", "dagster-instance")
    assert launcher.postgres_password_secret == "dagster-postgresql-secret"  # noqa: S105 (a Secret's name)
    assert (launcher.env_secrets, launcher.env_config_maps) == (["rivya-api"], ["rivya-settings"])
    assert launcher.run_k8s_config["container_config"]["resources"]["limits"] == {"memory": "1Gi"}


def test_helm_values_carry_the_limits_of_the_k8s_profile():
    values, profile = loaded_yaml(DEPLOY / "k8s" / "values.yaml"), loaded_yaml(PROFILES["k8s"])

    runs, pools = profile["concurrency"]["runs"], profile["concurrency"]["pools"]
    assert values["concurrency"]["runs"] == {
        "maxConcurrentRuns": runs["max_concurrent_runs"],
        "tagConcurrencyLimits": runs["tag_concurrency_limits"],
    }
    assert values["concurrency"]["pools"] == {"defaultLimit": pools["default_limit"]}
    retries = profile["run_retries"]
    assert values["dagsterDaemon"]["runRetries"] == {
        "enabled": retries["enabled"],
        "maxRetries": retries["max_retries"],
        "retryOnAssetOrOpFailure": retries["retry_on_asset_or_op_failure"],
    }
    assert (
        values["runLauncher"]["config"]["k8sRunLauncher"]["jobNamespace"]
        == profile["run_launcher"]["config"]["job_namespace"]
    )


def test_helm_values_keep_the_webserver_inside_the_cluster():
    """Failure mode: a webserver without a login reachable from outside, where anyone can launch paid runs."""
    values = loaded_yaml(DEPLOY / "k8s" / "values.yaml")

    assert values["dagsterWebserver"]["service"]["type"] == "ClusterIP"
    assert "ingress" not in values or not values["ingress"].get("enabled")


def test_k8s_code_location_runs_every_job_on_dagsters_executor_with_valid_config():
    defs = import_file(DEPLOY / "k8s" / "definitions.py").defs

    Definitions.validate_loadable(defs)
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "k8s"
    resolved = validate_run_config(job, {})  # the executor's configured values against its own schema
    assert set(resolved["execution"]) == {"k8s"}


def test_k8s_executor_gives_the_store_step_its_own_pod_resources():
    config = validate_run_config(
        import_file(DEPLOY / "k8s" / "definitions.py").defs.resolve_implicit_global_asset_job_def(), {}
    )["execution"]["k8s"]

    assert config["max_concurrent"] == 2
    assert config["per_step_k8s_config"]["stored_video"]["container_config"]["resources"]["limits"] == {"memory": "1Gi"}
