"""End to end: the continuous_training__fraud DAG under `airflow dags test` on real Airflow, Feast, GX, torchrun
(2 processes, gloo) and MLflow, each in an isolated ctrain home."""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING

import fsspec
import pytest

from ctrain_examples import fraud
from support import CANARIES, airflow_cli, files_under, leaks, make_env, mlflow_records

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow

DAYS, START, ROWS_PER_DAY = 40, "2026-01-01", 1500


def _prepare(home: Path) -> dict[str, str]:
    # Every credential a deployment hands ctrain is set, to a canary that must never be written anywhere.
    env = {**make_env(home), **CANARIES}
    fraud.generate(home / "data", days=DAYS, start=START, rows_per_day=ROWS_PER_DAY, seed=0)
    migrated = airflow_cli(["db", "migrate"], env)
    assert migrated.returncode == 0, migrated.stdout[-3000:] + migrated.stderr[-3000:]
    return env


def _run_dag(env: dict[str, str]):
    return airflow_cli(["dags", "test", "continuous_training__fraud"], env, timeout=1200)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One full DAG run, then a second identical trigger (which must reuse everything)."""
    home = tmp_path_factory.mktemp("e2e")
    env = _prepare(home)
    first = _run_dag(env)
    (home / "first-run.log").write_text(first.stdout + first.stderr)
    assert first.returncode == 0, f"DAG run failed; log in {home}/first-run.log\n" + first.stdout[-6000:]
    second = _run_dag(env)
    (home / "second-run.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, f"second DAG run failed; log in {home}/second-run.log\n" + second.stdout[-6000:]
    from ctrain.settings import Settings

    return Settings(home=home), first.stdout + first.stderr, second.stdout + second.stderr


def _client(settings):
    from ctrain.registry import get_client

    return get_client(settings)


def _champion(settings):
    return _client(settings).get_model_version_by_alias(settings.model_name, "champion")


def test_snapshot_manifest_matches_the_parquet_files(trained):
    settings, *_ = trained
    dataset_version = _champion(settings).tags["dataset_version"]
    root = f"{settings.resolved_object_root}/datasets/{dataset_version}"
    with fsspec.open(f"{root}/manifest.json") as fh:
        manifest = json.load(fh)
    assert manifest["dataset_version"] == dataset_version
    assert manifest["feature_service"] == "fraud_model_v1"
    for split in ("train", "val", "test"):
        meta = manifest["splits"][split]
        with fsspec.open(f"{root}/{meta['file']}", "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == meta["sha256"], split
        assert meta["rows"] > 0
    # Time-based split: train ends before val starts, val before test.
    assert manifest["splits"]["train"]["end"] <= manifest["splits"]["val"]["start"]
    assert manifest["splits"]["val"]["end"] <= manifest["splits"]["test"]["start"]


def test_validation_result_is_a_success(trained):
    settings, *_ = trained
    run = _client(settings).get_run(_champion(settings).run_id)
    with fsspec.open(run.data.tags["gx_report_uri"]) as fh:
        report = json.load(fh)
    assert report["success"] is True
    assert fsspec.core.url_to_fs(run.data.tags["gx_docs_uri"])[0].exists(
        fsspec.core.url_to_fs(run.data.tags["gx_docs_uri"])[1])


def test_one_mlflow_run_with_per_epoch_metrics(trained):
    settings, *_ = trained
    client = _client(settings)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "two DAG runs on the same data and config must share one training run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_roc_auc")
    epochs = [m.step for m in history]
    assert len(epochs) >= 2 and epochs == sorted(set(epochs)), f"val_roc_auc per epoch, no duplicates: {epochs}"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= len(epochs)
    # Data lineage: the snapshot is the run's dataset input, its digest the dataset version.
    digests = {d.dataset.digest for d in run.inputs.dataset_inputs}
    assert run.data.tags["dataset_version"] in digests


def test_champion_registered_once_with_lineage(trained):
    settings, *_ = trained
    client = _client(settings)
    versions = client.search_model_versions(f"name = '{settings.model_name}'")
    assert len(versions) == 1, "the second trigger must not register a second version"
    mv = _champion(settings)
    assert {"champion", "challenger"} <= set(mv.aliases)
    for tag in ("dataset_version", "feature_service", "feature_service_hash", "source_partitions", "gx_result_id", "git_sha", "config_hash", "seed",
                "dag_run_id", "mlflow_run_id", "checkpoint"):
        assert mv.tags.get(tag), f"lineage tag {tag} missing"
    assert mv.tags["mlflow_run_id"] == mv.run_id
    assert f"transactions {START}.." in mv.tags["source_partitions"]
    # The checkpoint the model came from is committed (manifest present).
    fs, path = fsspec.core.url_to_fs(mv.tags["checkpoint"])
    assert fs.exists(f"{path}/manifest.json")


def test_policy_decisions_are_recorded_with_intervals_and_the_model_card(trained):
    """The first run approves v1 (no champion); the second run's govern compares v1 with itself as champion
    on the same test rows: difference 0, not "better", non-inferior."""
    from ctrain.governance import load_policy
    from ctrain.settings import PROJECT_ROOT

    settings, *_ = trained
    loaded = load_policy(settings.definition, PROJECT_ROOT / "pipelines")
    client = _client(settings)
    mv = _champion(settings)
    assert mv.tags["governance.decision"] == "approve"
    assert (mv.tags["governance.policy_version"], mv.tags["governance.policy_sha256"]) == (
        loaded.policy.version, loaded.sha256)
    with fsspec.open(mv.tags["governance.audit"], "rt") as fh:
        audit = json.load(fh)
    rules = {r["name"]: r for r in audit["details"]["rules"]}
    assert set(rules) == {"floor:test_roc_auc", "floor:test_pr_auc", "non_inferiority", "slice:amount",
                          "validation", "lineage", "model_size", "latency"}
    assert all(r["passed"] for r in rules.values()), audit["reasons"]
    ni = rules["non_inferiority"]["numbers"]
    assert (ni["method"], ni["estimate"], ni["better"]) == ("delong", 0.0, False)  # v1 against itself
    assert audit["previous_champion"] == str(mv.version)
    judged = [s for s in rules["slice:amount"]["numbers"]["segments"] if s["judged"]]
    assert len(judged) >= 3
    assert rules["lineage"]["numbers"]["image"] == "local"
    decision = client.download_artifacts(mv.run_id, "governance/decision.json", str(settings.home))
    with open(decision) as fh:
        assert json.load(fh)["rules"] == audit["details"]["rules"]
    assert mv.tags["model_card"].endswith("/model_card/card.html") and "Model card:" in mv.description


def test_champion_reproduces_logged_test_auc(trained):
    import mlflow.pyfunc
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    settings, *_ = trained
    mv = _champion(settings)
    logged = _client(settings).get_run(mv.run_id).data.metrics["test_roc_auc"]
    root = f"{settings.resolved_object_root}/datasets/{mv.tags['dataset_version']}"
    with fsspec.open(f"{root}/manifest.json") as fh:
        manifest = json.load(fh)
    with fsspec.open(f"{root}/{manifest['splits']['test']['file']}", "rb") as fh:
        test = pd.read_parquet(fh)
    mlflow.set_tracking_uri(settings.resolved_tracking_uri)
    mlflow.set_registry_uri(settings.resolved_tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@champion")
    served = model.predict(test[manifest["feature_columns"]])
    assert list(served.columns) == ["score"]  # the registered model answers with a named column
    scores = served["score"].to_numpy()
    assert roc_auc_score(test["label"], scores) == pytest.approx(logged, abs=1e-6)
    assert logged > 0.80


def test_second_trigger_reused_the_training(trained):
    *_, second_log = trained
    assert "already trained" in second_log
    assert "launching:" not in second_log


def test_bad_data_fails_validation_and_nothing_is_trained(tmp_path):
    env = _prepare(tmp_path)
    from ctrain.settings import Settings

    settings = Settings(home=tmp_path)
    day = fraud.list_partitions(settings.resolved_data_root, fraud.CUSTOMER_STATS)[DAYS // 2]
    fraud.inject_nulls(settings.resolved_data_root, fraud.CUSTOMER_STATS, day, fraction=0.3)

    result = _run_dag(env)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "failed" in log and "expect_column_values_to_not_be_null" in log
    assert "launching:" not in log
    client = _client(settings)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
    assert client.search_registered_models() == []
    fs, path = fsspec.core.url_to_fs(f"{settings.resolved_object_root}/checkpoints")
    assert not fs.exists(path)


def test_online_store_serves_the_newest_offline_values(trained):
    import pandas as pd

    from ctrain.featurestore import get_online_features

    settings, *_ = trained
    newest = fraud.list_partitions(settings.resolved_data_root, fraud.CUSTOMER_STATS)[-1]
    offline = pd.read_parquet(fraud.partition_path(settings.resolved_data_root, fraud.CUSTOMER_STATS, newest))
    row = offline.iloc[0]
    online = get_online_features(settings, [{"customer_id": int(row["customer_id"]), "merchant_id": 0}])
    assert online["customer_avg_amount_30d"][0] == pytest.approx(row["customer_avg_amount_30d"])
    assert online["customer_chargeback_rate_90d"][0] == pytest.approx(row["customer_chargeback_rate_90d"])


def test_demo_summary_shows_dataset_version_and_data_docs(trained):
    from ctrain.demo import summary

    settings = trained[0]
    mv = _champion(settings)
    run = _client(settings).get_run(mv.run_id)
    text = summary(settings)
    version = mv.tags["dataset_version"]
    assert f"dataset version     : {version}  (feature service fraud_model_v1)" in text
    docs = run.data.tags["gx_docs_uri"]
    assert docs.endswith(".html") and f"                      {docs}" in text
    with fsspec.open(docs, "rt") as page:  # the printed Data Docs location is a real page
        assert "<html" in page.read(4096).lower()
    assert f"model               : {settings.model_name} v{mv.version}" in text
    assert "(pipeline fraud)" in text
    assert f"roc_auc={run.data.metrics['test_roc_auc']:.4f} (primary, higher is better)" in text
    # The decision with every rule's reason (the non-inferiority interval among them) and the model card.
    assert f"decision            : approve under policy {mv.tags['governance.policy_version']}" in text
    assert re.search(r"^  pass floor:test_roc_auc: ", text, re.M), text
    assert re.search(r"^  pass non_inferiority: .* interval \[[-+]", text, re.M), text  # e.g. [-0.0100, +0.0200]
    assert f"model card          : {mv.tags['model_card']}" in text
    assert f"ctrain rollback {settings.model_name} --to previous" in text


def test_no_credential_reaches_a_log_mlflow_or_storage(trained):
    settings, first_log, second_log = trained
    assert "launching:" in first_log  # the trainer ran, in an environment holding the canaries
    found = leaks([("first DAG run output", first_log.encode()), ("second DAG run output", second_log.encode())])
    found += leaks(files_under(settings.home))  # airflow.db, mlflow.db, task logs, artifacts, objects, results
    found += leaks(mlflow_records(settings.resolved_tracking_uri))
    assert found == []
