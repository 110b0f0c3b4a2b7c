"""Loop behaviour on real 2-process gloo runs of the debug config: golden losses, bit-identical reruns,
exact kill+resume, guardrails, non-finite handling, early stopping, accumulation, a second task type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from mlflow import MlflowClient
from trainer_testkit import TrainerRun, served_predictions, write_snapshot

GOLDEN = Path(__file__).parent / "golden" / "debug_losses.json"


def epoch_series(run: TrainerRun, key: str) -> list[float]:
    client = MlflowClient(run.tracking_uri)
    history = client.get_metric_history(run.result()["mlflow_run_id"], key)
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"duplicate steps in {key}: {sorted(steps)}"
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def test_golden_losses_of_the_debug_config(finished: TrainerRun) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert epoch_series(finished, "train_loss") == pytest.approx(golden["train_loss"], abs=1e-6)
    assert epoch_series(finished, "val_loss") == pytest.approx(golden["val_loss"], abs=1e-6)
    assert finished.result()["metrics"]["test_loss"] == pytest.approx(golden["test_loss"], abs=1e-6)


def test_two_runs_give_bit_identical_weights(finished: TrainerRun, trainer_run: TrainerRun) -> None:
    proc = trainer_run(nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, reference = trainer_run.weights(), finished.weights()
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_sigkill_mid_epoch_then_torchrun_restart_resumes_exactly(
    finished: TrainerRun, trainer_run: TrainerRun
) -> None:
    # Rank 1 dies before step 17 (epoch 2, mid-epoch); the last checkpoint is step 15.
    proc = trainer_run(
        "checkpoint.every_steps=5",
        nproc=2,
        max_restarts=1,
        # step_delay_s: time for the async step-15 save to commit before the kill
        faults={"kill_at_step": 17, "kill_rank": 1, "step_delay_s": 0.05},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fault injection: SIGKILL at step 17" in proc.stderr
    assert "resumed from" in proc.stderr and "step-00000015" in proc.stderr
    ours, reference = trainer_run.weights(), finished.weights()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    # One MLflow run across the restart, no duplicated epoch points, same metrics as uninterrupted.
    assert len(trainer_run.runs()) == 1
    assert epoch_series(trainer_run, "val_loss") == epoch_series(finished, "val_loss")
    assert trainer_run.result()["metrics"] == finished.result()["metrics"]


def test_nonfinite_loss_on_one_rank_stops_every_rank_with_exit_70(trainer_run: TrainerRun) -> None:
    proc = trainer_run(nproc=2, faults={"nonfinite_loss_step": 15, "nonfinite_loss_rank": 1})
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (
            f"[rank {rank}] ERROR trainer: non-finite gradient norm (nan) at optimizer step 15" in proc.stderr
        )
    result = trainer_run.result()
    assert result["status"] == "failed" and result["exit_code"] == 70 and result["retryable"] is False
    # The last checkpoint is the good epoch-1 state; nothing at or after the bad step.
    steps = sorted(p.name for p in trainer_run.checkpoint_dir().iterdir())
    assert steps == ["step-00000010"]
    assert (trainer_run.checkpoint_dir() / "step-00000010" / "manifest.json").exists()
    (run,) = trainer_run.runs()
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["last_failure"]
    client = MlflowClient(trainer_run.tracking_uri)
    assert client.search_logged_models([run.info.experiment_id]) == []  # no model, nothing to register


def test_max_steps_guardrail_stops_with_a_final_checkpoint(trainer_run: TrainerRun) -> None:
    proc = trainer_run("train.max_steps=13", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = trainer_run.result()
    assert result["stopped_reason"] == "max_steps"
    assert result["global_step"] == 13
    manifest = json.loads((trainer_run.checkpoint_dir() / "step-00000013" / "manifest.json").read_text())
    assert manifest["step"] == 13


def test_wall_clock_guardrail_stops_and_checkpoints(trainer_run: TrainerRun) -> None:
    proc = trainer_run("train.max_wall_clock_s=0.5", nproc=2, faults={"step_delay_s": 0.1})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = trainer_run.result()
    assert result["stopped_reason"] == "max_wall_clock"
    step = result["global_step"]
    assert step < 30 and step % 5 == 0  # agreed at a log interval (debug: every 5 steps)
    assert (trainer_run.checkpoint_dir() / f"step-{step:08d}" / "manifest.json").exists()


def test_flat_validation_curve_stops_early_at_the_expected_epoch_and_warns(trainer_run: TrainerRun) -> None:
    # An SGD step of 1e-30 cannot move float32 weights: val_loss is exactly flat from epoch 1, so with
    # patience 2 the run stops after epoch 3, and the plateau warning fires after K=2 evaluations.
    proc = trainer_run(
        "optimizer.name=sgd",
        "optimizer.lr=1e-30",
        "optimizer.momentum=0",
        "train.epochs=8",
        "train.plateau_warning_evals=2",
        nproc=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = trainer_run.result()
    assert result["stopped_reason"] == "early_stopping"
    assert result["epochs_run"] == 3
    assert result["best_epoch"] == 1
    (run,) = trainer_run.runs()
    assert run.data.tags["plateau_warning"].startswith("val_loss has not improved for 2 evaluations")
    assert "val_loss has not improved for 2 evaluations" in proc.stderr


def test_gradient_accumulation_and_world_size_do_not_change_the_math(
    finished: TrainerRun, trainer_run: TrainerRun
) -> None:
    # Global batch 64 as 1 process x 2 micro-batches of 32, versus 2 processes x 32: same samples per
    # step and the same normalisation, so the weights agree up to float summation order. Dropout masks
    # differ with the rank layout, so compare without dropout on both sides.
    proc = trainer_run("train.grad_accum_steps=2", "model.kwargs.dropout=0.0", nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = TrainerRun(trainer_run.tmp / "ref", finished.dataset_uri)
    proc = reference("model.kwargs.dropout=0.0", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = trainer_run.weights(), reference.weights()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)


def test_regression_task_trains_and_serves(tmp_path: Path) -> None:
    snapshot = write_snapshot(tmp_path / "regression", task="regression")
    run = TrainerRun(tmp_path, snapshot)
    proc = run(
        "task.type=regression",
        "early_stopping.monitor=val_rmse",
        "train.epochs=10",
        "optimizer.lr=0.03",
        nproc=1,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = run.result()
    metrics = result["metrics"]
    assert {"test_rmse", "test_mae", "test_loss", "best_val_rmse"} <= set(metrics)
    assert metrics["test_rmse"] < 0.3  # the target's std is ~2.7: the model learned the linear rule
    assert metrics["test_loss"] == pytest.approx(metrics["test_rmse"] ** 2, rel=1e-4)
    test, predicted = served_predictions(run, tmp_path / "regression")
    predicted = predicted.reshape(-1)
    rmse = float(np.sqrt(np.mean((predicted - test["label"].to_numpy()) ** 2)))
    assert rmse == pytest.approx(metrics["test_rmse"], rel=1e-4)


def test_multiclass_task_trains_with_ddp_and_serves_class_probabilities(tmp_path: Path) -> None:
    snapshot = write_snapshot(tmp_path / "multiclass", task="multiclass", num_classes=3)
    run = TrainerRun(tmp_path, snapshot)
    proc = run(
        "task.type=multiclass",
        "task.num_classes=3",
        "early_stopping.monitor=val_accuracy",
        "early_stopping.mode=max",
        "train.epochs=6",
        nproc=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = run.result()["metrics"]
    assert {"test_accuracy", "test_roc_auc", "test_loss", "best_val_accuracy"} <= set(metrics)
    assert metrics["test_accuracy"] > 0.6  # three balanced classes: chance is 1/3
    test, probs = served_predictions(run, tmp_path / "multiclass")
    assert probs.shape == (len(test), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float(np.mean(probs.argmax(axis=1) == test["label"].to_numpy()))
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_system_metrics_and_resolved_config_are_tracked(trainer_run: TrainerRun) -> None:
    proc = trainer_run(
        "tracking.system_metrics=true",
        "tracking.system_metrics_interval_s=0.2",
        nproc=1,
        faults={"step_delay_s": 0.05},  # a run long enough for several samples
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = trainer_run.runs()
    client = MlflowClient(trainer_run.tracking_uri)
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 3 and all(0 <= m.value <= 100 * psutil.cpu_count() for m in cpu)
    assert memory and all(m.value > 0 for m in memory)


def test_a_hung_peer_fails_the_run_fast_and_retryably(trainer_run: TrainerRun) -> None:
    # Rank 1 stops responding before step 7: rank 0 waits in DDP's all-reduce until the process-group
    # timeout, then the run ends with the retryable exit code instead of hanging for hours.
    proc = trainer_run(
        # 15 s: longer than rank 0 takes to open its MLflow run before step 1 on a loaded machine
        "distributed.timeout_s=15", nproc=2, timeout=120, faults={"hang_at_step": 7, "hang_rank": 1}
    )
    assert proc.returncode != 0
    result = trainer_run.result()
    assert result["status"] == "failed" and result["exit_code"] == 75 and result["retryable"] is True
    assert "fault injection: hanging at step 7" in proc.stderr
    (run,) = trainer_run.runs()
    assert run.info.status == "KILLED"
