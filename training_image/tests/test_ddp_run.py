"""A 2-process gloo run of the debug config: result.json, MLflow run content, served model, checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score
from trainer_testkit import FEATURES, TrainerRun

EPOCHS, STEPS_PER_EPOCH = 3, 10  # debug.yaml: 3 epochs, batch 64 over 640 train rows


def test_result_json_follows_the_contract(finished: TrainerRun, snapshot_uri: str) -> None:
    result = finished.result()
    manifest = json.loads((Path(snapshot_uri.removeprefix("file://")) / "manifest.json").read_text())
    assert result["status"] == "succeeded"
    assert result["world_size"] == 2
    assert result["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert result["epochs_run"] == EPOCHS
    assert result["dataset_version"] == manifest["dataset_version"]
    assert result["model_uri"].startswith("models:/m-")  # the logged model itself, not a runs:/ path
    assert result["stopped_reason"] == "completed"
    assert set(result["metrics"]) >= {"test_roc_auc", "test_pr_auc", "test_loss", "best_val_roc_auc"}
    assert result["metrics"]["test_roc_auc"] > 0.85  # the synthetic rule is learnable
    assert 1 <= result["best_epoch"] <= EPOCHS
    assert result["checkpoint"].endswith(f"/step-{result['best_epoch'] * STEPS_PER_EPOCH:08d}")


def test_one_mlflow_run_with_epoch_metrics_params_and_dataset(finished: TrainerRun) -> None:
    result = finished.result()
    client = MlflowClient(finished.tracking_uri)
    experiment = client.get_experiment_by_name("ctrain-debug")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_roc_auc", "val_pr_auc", "lr"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key
    for key in ("test_roc_auc", "test_pr_auc", "test_loss", "test_accuracy"):
        assert run.data.metrics[key] == pytest.approx(result["metrics"][key])
    assert client.get_metric_history(run.info.run_id, "step/loss")  # per-step metrics arrived
    assert run.data.params["config_hash"] == result["config_hash"]
    assert run.data.params["train.batch_size"] == "64"
    assert run.data.params["model.factory"] == "trainer.model:mlp"
    inputs = run.inputs.dataset_inputs
    assert [d.dataset.digest for d in inputs] == [result["dataset_version"]]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "weights")}
    assert artifacts == {"weights/model.safetensors"}
    local = client.download_artifacts(run.info.run_id, "config/resolved.yaml", str(finished.tmp))
    resolved = yaml.safe_load(Path(local).read_text())
    assert resolved["train"]["batch_size"] == 64 and resolved["seed"] == 0
    assert resolved["data"]["dataset_uri"] == finished.dataset_uri
    plots = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots.get("plots/loss_curve.png", 0) > 1000


def test_served_model_reproduces_logged_test_auc(finished: TrainerRun, snapshot_uri: str) -> None:
    result = finished.result()
    mlflow.set_tracking_uri(finished.tracking_uri)
    model = mlflow.pyfunc.load_model(result["model_uri"])
    test = pd.read_parquet(Path(snapshot_uri.removeprefix("file://")) / "test.parquet")
    served = model.predict(test[FEATURES])
    assert list(served.columns) == ["score"]  # a named column (trainer.serving)
    scores = served["score"]
    assert ((scores >= 0) & (scores <= 1)).all()  # probabilities, not logits
    assert roc_auc_score(test["label"], scores) == pytest.approx(result["metrics"]["test_roc_auc"], abs=1e-6)
    # Columns are matched by name, so a reordered frame scores the same.
    reordered = model.predict(test[FEATURES[::-1]])["score"]
    assert list(reordered) == pytest.approx(list(scores))


def test_checkpoints_are_committed_with_valid_manifests(finished: TrainerRun) -> None:
    result = finished.result()
    steps = sorted(p.name for p in finished.checkpoint_dir().iterdir())
    best = f"step-{result['best_epoch'] * STEPS_PER_EPOCH:08d}"
    last_two = [f"step-{s * STEPS_PER_EPOCH:08d}" for s in (EPOCHS - 1, EPOCHS)]
    assert set(steps) == {*last_two, best}  # keep_last=2 plus the best
    for name in steps:
        directory = finished.checkpoint_dir() / name
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["step"] == int(name.removeprefix("step-"))
        assert manifest["world_size"] == 2
        assert manifest["config_hash"] == result["config_hash"]
        assert manifest["dataset_version"] == result["dataset_version"]
        on_disk = {p.name for p in directory.iterdir()} - {"manifest.json"}
        assert set(manifest["files"]) == on_disk
        assert {".metadata", "trainer_state.json"} <= on_disk
        for file, digest in manifest["files"].items():
            assert hashlib.sha256((directory / file).read_bytes()).hexdigest() == digest
