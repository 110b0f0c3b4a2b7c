"""Pipeline steps without Airflow: a diverging training fails terminally and leaves nothing to register;
a trainer that dies early leaves no MLflow run RUNNING; overrides beyond the operator's limits are refused."""

from __future__ import annotations

import os

import pytest

from ctrain import pipeline, registry
from ctrain.errors import ConfigError, TrainingFailed
from ctrain.settings import PROJECT_ROOT
from ctrain_examples import fraud
from support import pipeline_settings

TOY_MODELS_DIR = PROJECT_ROOT / "training_image" / "tests"  # toy_models: test model factories


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    home = tmp_path_factory.mktemp("pipeline")
    settings = pipeline_settings(home, training__config=PROJECT_ROOT / "training_image" / "configs" / "debug.yaml")
    fraud.generate(settings.resolved_data_root, days=30, start="2026-01-01", rows_per_day=800, seed=1)
    snapshot = pipeline.build_dataset(settings)
    return settings, snapshot, pipeline.validate(settings, snapshot)


def test_nan_loss_is_terminal_with_the_trainers_exit_code(validated, monkeypatch):
    settings, snapshot, validation = validated
    # A user model whose loss turns NaN at step 3 (a test factory), allowed by the operator's setting.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TOY_MODELS_DIR), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CTRAIN_MODEL_FACTORY_PREFIXES", "trainer.model,toy_models")  # for any re-read
    settings = settings.model_copy(update={"model_factory_prefixes": ("trainer.model", "toy_models")})
    lines: list[str] = []
    with pytest.raises(TrainingFailed) as info:
        pipeline.train(settings, snapshot, validation, dag_id="t", dag_run_id="r1",
                       # typed values as the UI's Param gives them: None must reach the trainer as null
                       overrides={"model.factory": "toy_models:nan_at_step", "model.kwargs": {"step": 3},
                                  "train.grad_clip_norm": None},
                       sink=lines.append)
    assert info.value.exit_code == 70, "torchrun's exit 1 must be mapped back to the trainer's 70"
    assert info.value.retryable is False
    assert any("launching:" in line for line in lines)
    client = registry.get_client(settings)
    assert client.search_registered_models() == []


def _runs_of(settings, run_key: str):
    client = registry.get_client(settings)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{registry.RUN_KEY_TAG}` = '{run_key}'")


def test_a_trainer_that_dies_before_its_tracker_leaves_no_run_running(validated):
    # A bad model.kwargs fails in the model factory, before the trainer opens its MLflow tracker: the
    # run the pipeline created must still be closed, FAILED (terminal), with the reason.
    settings, snapshot, validation = validated
    lines: list[str] = []
    with pytest.raises(TrainingFailed) as info:
        pipeline.train(settings, snapshot, validation, dag_id="t", dag_run_id="r-kwargs",
                       overrides={"model.kwargs": {"no_such_arg": 1}}, sink=lines.append)
    assert info.value.exit_code == 65 and info.value.retryable is False
    launched = next(line for line in lines if line.startswith("launching:"))
    # The pipeline always hands the trainer the allow-list and a wall-clock/step ceiling.
    assert "model.factory_prefixes=" in launched and "trainer.model" in launched
    assert f"train.max_wall_clock_s={settings.max_train_wall_clock_s}" in launched
    assert f"train.max_steps={settings.max_steps}" in launched
    key = pipeline.run_identity(settings, "t", snapshot, {"model.kwargs": {"no_such_arg": 1}}).run_key
    [run] = _runs_of(settings, key)
    assert run.info.status == "FAILED"
    assert "model.kwargs" in run.data.tags[registry.FAILURE_TAG]
    assert "no_such_arg" in run.data.tags[registry.FAILURE_TAG]


def test_overrides_beyond_the_limits_are_refused_before_a_run_exists(validated):
    settings, snapshot, validation = validated
    client = registry.get_client(settings)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    before = len(client.search_runs([experiment.experiment_id])) if experiment else 0
    for overrides, named in (({"train.epochs": 10**9, "early_stopping.enabled": False}, "CTRAIN_MAX_EPOCHS"),
                             ({"model.factory": "os:system"}, "CTRAIN_MODEL_FACTORY_PREFIXES")):
        with pytest.raises(ConfigError, match=named):
            pipeline.train(settings, snapshot, validation, dag_id="t", dag_run_id="r-big", overrides=overrides)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    assert (len(client.search_runs([experiment.experiment_id])) if experiment else 0) == before


def test_a_result_record_that_is_not_an_object_is_a_data_error(tmp_path):
    from ctrain.errors import DataError

    (tmp_path / "result.json").write_text("null")
    with pytest.raises(DataError, match="result.json is not a JSON object"):
        pipeline._read_result(f"file://{tmp_path}")
    assert pipeline._read_result(f"file://{tmp_path / 'absent'}") is None
