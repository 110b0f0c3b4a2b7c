"""Pipeline steps without Airflow: a diverging training fails terminally and leaves nothing to register."""

from __future__ import annotations

import pytest

from ctrain import datagen, pipeline, registry
from ctrain.errors import TrainingFailed
from ctrain.settings import PROJECT_ROOT, Settings


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    home = tmp_path_factory.mktemp("pipeline")
    settings = Settings(home=home, trainer_config=PROJECT_ROOT / "training_image" / "configs" / "debug.yaml")
    datagen.generate(settings.resolved_data_root, days=30, start="2026-01-01", rows_per_day=800, seed=1)
    snapshot = pipeline.build_dataset(settings)
    return settings, snapshot, pipeline.validate(settings, snapshot)


def test_nan_loss_is_terminal_with_the_trainers_exit_code(validated):
    settings, snapshot, validation = validated
    lines: list[str] = []
    with pytest.raises(TrainingFailed) as info:
        pipeline.train(settings, snapshot, validation, dag_id="t", dag_run_id="r1",
                       # typed values as the UI's Param gives them: None must reach the trainer as null
                       overrides={"faults.nonfinite_loss_step": 3, "train.grad_clip_norm": None},
                       sink=lines.append)
    assert info.value.exit_code == 70, "torchrun's exit 1 must be mapped back to the trainer's 70"
    assert info.value.retryable is False
    assert any("launching:" in line for line in lines)
    client = registry.get_client(settings)
    assert client.search_registered_models() == []
