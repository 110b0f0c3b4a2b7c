"""The demo runs any pipeline: its generator comes from the definition, imported only from the examples."""

from __future__ import annotations

import pytest

from ctrain import demo
from ctrain.errors import ConfigError
from support import pipeline_settings


def test_generator_comes_from_the_definition(tmp_path):
    from ctrain_examples import delivery_eta

    settings = pipeline_settings(tmp_path, "delivery_eta")
    assert demo.example_generator(settings.definition) is delivery_eta.generate


@pytest.mark.parametrize("datagen", ["os:system", "ctrain_examples_evil.x:generate"])
def test_generator_outside_the_examples_is_refused(tmp_path, datagen):
    settings = pipeline_settings(tmp_path, "delivery_eta", example__datagen=datagen)
    with pytest.raises(ConfigError, match="imports generators only from"):
        demo.example_generator(settings.definition)


def test_summary_without_a_champion_names_the_model(tmp_path):
    settings = pipeline_settings(tmp_path, "delivery_eta")
    assert "no delivery_eta@champion" in demo.summary(settings)


def test_metric_line_shows_metrics_only_evaluate_computed():
    from ctrain.definition import PROJECT_ROOT, load_file
    from ctrain.demo import _metric_line

    definition = load_file(PROJECT_ROOT / "pipelines" / "delivery_eta.yaml")
    line = _metric_line(definition, {"test_rmse": 2.9, "test_mae": 2.1, "eval_test_r2": 0.91, "test_loss": 8.4})
    assert line == "rmse=2.9000 (primary, lower is better) mae=2.1000 r2=0.9100 loss=8.4000"
