"""User model factories: the allow-list (refused at load, before any import), the export check before
the first step, DDP options a user model needs, and the user model's package recorded with the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import toy_models
from mlflow import MlflowClient

from trainer.config import load_config
from trainer.errors import ConfigError
from trainer.export import check_exportable
from trainer.model import NOT_A_DISTRIBUTION, ModelSpec, factory_package, mlp
from trainer.tasks import Task

if TYPE_CHECKING:
    from trainer_testkit import TrainerRun

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
LOCATIONS = ["data.dataset_uri=file:///nowhere", "checkpoint.uri=file:///nowhere", "output.uri=file:///nowhere"]


@pytest.mark.parametrize("factory", ["os:system", "trainer.modelx:build", "trainer:model"])
def test_factory_outside_the_prefixes_is_refused_at_load(factory):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [*LOCATIONS, f"model.factory={factory}", "model.factory_prefixes=[trainer.model]"])
    message = str(err.value)
    assert f"model.factory {factory!r}" in message
    assert "CTRAIN_MODEL_FACTORY_PREFIXES" in message


@pytest.mark.parametrize("factory", ["trainer.model:mlp", "trainer.model.extra:build"])
def test_factory_under_a_prefix_is_accepted(factory):
    cfg = load_config(CONFIG, [*LOCATIONS, f"model.factory={factory}", "model.factory_prefixes=[trainer.model]"])
    assert cfg.model.factory == factory


def test_without_prefixes_any_module_may_be_named():
    # Command-line use (and the trainer's own tests): whoever runs the command chooses the code anyway.
    assert load_config(CONFIG, [*LOCATIONS, "model.factory=test_helpers:anything"]).model.factory_prefixes is None


def test_a_refused_factory_is_never_imported(tmp_path):
    # A module that leaves a file behind when imported: the refusal must come before any import.
    canary = tmp_path / "imported"
    (tmp_path / "canary_factory.py").write_text(f"open({str(canary)!r}, 'w').close()\ndef build(spec): ...\n")
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--config", str(CONFIG),
         *[arg for loc in LOCATIONS for arg in ("--set", loc)],
         "--set", "model.factory=canary_factory:build", "--set", "model.factory_prefixes=[trainer.model]"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 65, done.stderr[-2000:]
    assert "'canary_factory' is not under the allowed prefixes trainer.model" in done.stderr
    assert not canary.exists()


SPEC = ModelSpec(4, 1, ("a", "b", "c", "d"), torch.zeros(4), torch.ones(4))


def test_an_exportable_model_passes_the_check_and_stays_in_training_mode():
    model = mlp(SPEC)
    check_exportable(model, Task("binary", None), torch.randn(8, 4), "trainer.model:mlp")
    assert model.training


def test_an_unexportable_model_fails_the_check_with_a_message_that_says_export():
    with pytest.raises(ConfigError) as err:
        check_exportable(toy_models.unexportable(SPEC), Task("binary", None), torch.randn(8, 4), "toy_models:x")
    message = str(err.value)
    assert message.startswith("the export of model.factory=toy_models:x failed")
    assert "data-dependent" in message  # torch.export's own first lines say why
    assert "training_image/README.md" in message and "Bring your own model" in message


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_an_unexportable_model_fails_in_seconds_before_any_step(trainer_run: TrainerRun, nproc: int):
    proc = trainer_run("model.factory=toy_models:unexportable", nproc=nproc)
    assert proc.returncode != 0
    failure = json.loads((trainer_run.tmp / "output" / "failure.json").read_text())
    assert failure["exit_code"] == 65 and failure["retryable"] is False
    assert "ConfigError: the export of model.factory=toy_models:unexportable failed" in failure["error"]
    assert "GuardOnDataDependentSymNode" in failure["error"]
    assert trainer_run.result() == failure
    # Nothing trained, nothing checkpointed, no MLflow run: it failed before the first step.
    assert list(trainer_run.checkpoint_dir().glob("step-*")) == []
    assert trainer_run.runs() == []


@pytest.mark.slow  # 2-process torchrun runs
def test_an_unused_parameter_fails_clearly_under_ddp_and_trains_with_find_unused_parameters(
    tmp_path: Path, snapshot_uri: str
):
    from trainer_testkit import TrainerRun

    refused = TrainerRun(tmp_path / "refused", snapshot_uri)
    proc = refused("model.factory=toy_models:unused_head", nproc=2)
    assert proc.returncode != 0
    result = refused.result()
    assert result["exit_code"] == 65 and result["retryable"] is False, result
    assert "model.factory=toy_models:unused_head: the model has parameters that received no gradient" in (
        result["error"]
    )
    assert "auxiliary_head.weight, auxiliary_head.bias" in result["error"]
    assert "Set distributed.find_unused_parameters=true" in result["error"]

    trained = TrainerRun(tmp_path / "trained", snapshot_uri)
    proc = trained("model.factory=toy_models:unused_head", "distributed.find_unused_parameters=true", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = trained.result()
    assert result["status"] == "succeeded" and result["global_step"] > 0
    assert np.isfinite(result["metrics"]["test_loss"])
    # The user model's package is recorded in result.json and on the MLflow run.
    assert result["model_package"] == {"name": "toy_models", "version": NOT_A_DISTRIBUTION}
    tags = MlflowClient(trained.tracking_uri).get_run(result["mlflow_run_id"]).data.tags
    assert tags["model_package"] == "toy_models" and tags["model_package_version"] == NOT_A_DISTRIBUTION


def test_the_default_model_records_no_user_package(finished: TrainerRun):
    assert finished.result()["model_package"] is None
    tags = MlflowClient(finished.tracking_uri).get_run(finished.result()["mlflow_run_id"]).data.tags
    assert "model_package" not in tags


def test_factory_package_names_the_installed_distribution_and_its_version():
    import importlib.metadata

    assert factory_package("numpy.random:default_rng") == {
        "name": "numpy", "version": importlib.metadata.version("numpy")
    }
    assert factory_package("toy_models:unused_head") == {"name": "toy_models", "version": NOT_A_DISTRIBUTION}
    assert factory_package("trainer.model:mlp") is None
