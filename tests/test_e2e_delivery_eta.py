"""End to end for the second example: ``continuous_training__delivery_eta`` (a regression of delivery
minutes, RMSE lower is better, other entities and columns than fraud) under ``airflow dags test`` on
real Airflow, Feast, GX, torchrun (2 processes, gloo) and MLflow, in an isolated ctrain home.

The same generic code as the fraud pipeline runs it: only ``pipelines/delivery_eta.yaml``, its Feast
declarations and its data differ."""

from __future__ import annotations

import json

import fsspec
import pytest

from ctrain.definition import load_file
from ctrain.governance import load_policy
from ctrain.settings import PROJECT_ROOT
from ctrain_examples import delivery_eta
from support import airflow_cli, make_env

pytestmark = pytest.mark.slow

NAME = "delivery_eta"
DEFINITION = load_file(PROJECT_ROOT / "pipelines" / f"{NAME}.yaml")
POLICY = load_policy(DEFINITION, PROJECT_ROOT / "pipelines").policy


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-delivery")
    env = {**make_env(home), "CTRAIN_PIPELINE": NAME}
    delivery_eta.generate(home / "data", days=20, rows_per_day=400)
    migrated = airflow_cli(["db", "migrate"], env)
    assert migrated.returncode == 0, migrated.stdout[-3000:] + migrated.stderr[-3000:]
    run = airflow_cli(["dags", "test", DEFINITION.dag_id], env, timeout=1200)
    (home / "run.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, f"DAG run failed; log in {home}/run.log\n" + run.stdout[-6000:]
    from ctrain.settings import Settings

    return Settings(home=home, pipeline=NAME), run.stdout + run.stderr


def _client(settings):
    from ctrain.registry import get_client

    return get_client(settings)


def test_champion_is_registered_under_the_definitions_name_with_lineage(trained):
    settings, _ = trained
    client = _client(settings)
    assert settings.model_name == DEFINITION.model.name == "delivery_eta"
    assert client.get_registered_model(settings.model_name).description == DEFINITION.model.description
    mv = client.get_model_version_by_alias(settings.model_name, "champion")
    for tag in ("dataset_version", "feature_service", "feature_service_hash", "gx_result_id", "config_hash",
                "mlflow_run_id", "checkpoint", "run_key", "dag_run_id", "git_sha"):
        assert mv.tags.get(tag), f"champion lacks lineage tag {tag}"
    assert mv.tags["feature_service"] == DEFINITION.feature_service
    assert "promotion_audit" in mv.tags and mv.tags["promoted_by"] == f"policy:{POLICY.version}"

    metrics = client.get_run(mv.run_id).data.metrics
    # Lower is better: the floor is a ceiling on RMSE (a constant predictor scores about the target's std).
    assert metrics["test_rmse"] < POLICY.floors["rmse"]
    for name in DEFINITION.test_metrics:  # evaluate logged every metric of the definition
        assert f"eval_{name}" in metrics, name
    assert metrics["eval_test_rmse"] == pytest.approx(metrics["test_rmse"], rel=1e-4)


def test_served_champion_reproduces_the_logged_test_rmse(trained):
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    settings, _ = trained
    client = _client(settings)
    mv = client.get_model_version_by_alias(settings.model_name, "champion")
    logged = client.get_run(mv.run_id).data.metrics["test_rmse"]
    root = f"{settings.resolved_object_root}/datasets/{mv.tags['dataset_version']}"
    with fsspec.open(f"{root}/manifest.json") as fh:
        manifest = json.load(fh)
    assert manifest["label_column"] == DEFINITION.events.label_column
    with fsspec.open(f"{root}/{manifest['splits']['test']['file']}", "rb") as fh:
        test = pd.read_parquet(fh)
    mlflow.set_tracking_uri(settings.resolved_tracking_uri)
    mlflow.set_registry_uri(settings.resolved_tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@champion")
    served = model.predict(test[manifest["feature_columns"]])
    assert list(served.columns) == ["prediction"]  # the registered model answers with a named column
    predicted = served["prediction"].to_numpy()
    rmse = float(np.sqrt(np.mean((predicted - test[DEFINITION.events.label_column].to_numpy()) ** 2)))
    assert rmse == pytest.approx(logged, rel=1e-4)


def test_governance_judged_rmse_lower_is_better(trained):
    settings, _ = trained
    mv = _client(settings).get_model_version_by_alias(settings.model_name, "champion")
    with fsspec.open(mv.tags["promotion_audit"], "rt") as fh:
        audit = json.load(fh)
    assert audit["policy_version"] == POLICY.version == mv.tags["governance.policy_version"]
    assert audit["policy_sha256"] == mv.tags["governance.policy_sha256"]
    assert audit["metrics_compared"]["metric"] == "test_rmse"
    assert "pass floor:test_rmse: test_rmse=" in audit["reasons"][0]
    assert "<= ceiling 6.0000 (lower is better)" in audit["reasons"][0]
    # The policy's decision itself (approve) is in the audit trail, with every rule's numbers.
    with fsspec.open(mv.tags["governance.audit"], "rt") as fh:
        decision = json.load(fh)
    assert decision["action"] == "approve" and mv.tags["governance.decision"] == "approve"
    rules = {r["name"]: r for r in decision["details"]["rules"]}
    assert set(rules) == {"floor:test_rmse", "floor:test_r2", "non_inferiority", "slice:distance_km", "validation",
                          "lineage", "model_size", "latency"}
    assert all(r["passed"] for r in rules.values())
    assert rules["slice:distance_km"]["numbers"]["metric"] == "rmse"
