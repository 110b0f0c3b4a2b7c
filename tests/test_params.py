"""ctrain.params: the trainer_overrides schema narrowed by settings, the task-side re-check, the limits passed on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import FormatChecker, ValidationError, validate

from ctrain import params
from ctrain.errors import ConfigError
from ctrain.settings import Settings

BASE = json.loads((Path(__file__).resolve().parents[1] / "dags" / "trainer_overrides.schema.json").read_text())


@pytest.fixture
def settings(tmp_path):
    return Settings(home=tmp_path, model_factory_prefixes="trainer.model,my_pkg.models", max_epochs=50,
                    max_steps=1000, max_batch_size=4096, max_train_wall_clock_s=600)


def _check(schema, overrides):
    validate(overrides, schema, format_checker=FormatChecker())


@pytest.mark.parametrize("overrides", [
    {"model.factory": "trainer.model:mlp"}, {"model.factory": "my_pkg.models.deep:build"},
    {"train.epochs": 50}, {"train.max_steps": None}, {"train.max_steps": 1000}, {"train.batch_size": 4096},
    {"train.max_wall_clock_s": 599.5},
])
def test_within_the_limits_is_accepted(settings, overrides):
    _check(params.trainer_overrides_schema(BASE, settings), overrides)
    params.check_trainer_overrides(settings, overrides)


@pytest.mark.parametrize(("overrides", "setting"), [
    ({"model.factory": "os:system"}, "CTRAIN_MODEL_FACTORY_PREFIXES"),
    ({"model.factory": "my_pkg.modelsx:build"}, "CTRAIN_MODEL_FACTORY_PREFIXES"),
    ({"train.epochs": 51}, "CTRAIN_MAX_EPOCHS"),
    ({"train.max_steps": 1001}, "CTRAIN_MAX_STEPS"),
    ({"train.batch_size": 4097}, "CTRAIN_MAX_BATCH_SIZE"),
    ({"train.max_wall_clock_s": 601}, "CTRAIN_MAX_TRAIN_WALL_CLOCK_S"),
])
def test_beyond_the_limits_is_refused_at_the_door_and_in_the_task(settings, overrides, setting):
    with pytest.raises(ValidationError) as err:
        _check(params.trainer_overrides_schema(BASE, settings), overrides)
    assert setting in str(err.value) and len(str(err.value)) < 1000
    with pytest.raises(ConfigError, match=setting):
        params.check_trainer_overrides(settings, overrides)


def test_the_base_schema_is_not_modified(settings):
    before = json.dumps(BASE, sort_keys=True)
    params.trainer_overrides_schema(BASE, settings)
    assert json.dumps(BASE, sort_keys=True) == before


def test_pipeline_limits_bound_every_run(settings):
    config = {"train": {"max_steps": 200}}
    assert params.pipeline_limits(settings, {}, config) == {
        "model.factory_prefixes": '["trainer.model", "my_pkg.models"]',
        "train.max_steps": "200",  # the config file asked for less than the ceiling
        "train.max_wall_clock_s": "600.0",  # nobody asked: the ceiling
    }
    limits = params.pipeline_limits(settings, {"train.max_steps": None, "train.max_wall_clock_s": 30}, config)
    assert limits["train.max_steps"] == "1000" and limits["train.max_wall_clock_s"] == "30"


def test_bad_prefixes_setting_names_the_variable(monkeypatch, tmp_path):
    from ctrain.settings import get_settings

    monkeypatch.setenv("CTRAIN_HOME", str(tmp_path))
    monkeypatch.setenv("CTRAIN_MODEL_FACTORY_PREFIXES", "os;system")
    with pytest.raises(ConfigError, match="CTRAIN_MODEL_FACTORY_PREFIXES"):
        get_settings()
