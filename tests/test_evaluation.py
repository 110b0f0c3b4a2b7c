"""Evaluation computes every metric of the definition's task from the served model's output, and the
generic control-plane modules name no example."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctrain import evaluation
from ctrain.definition import TASK_METRICS, PipelineDefinition, load_all
from ctrain.settings import PROJECT_ROOT

DEFINITIONS = load_all(PROJECT_ROOT / "pipelines")


class _Served:
    """Stands in for a loaded pyfunc model: returns fixed outputs."""

    def __init__(self, outputs: np.ndarray) -> None:
        self.outputs = outputs

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        assert list(features.columns) == ["x"] and features.dtypes.iloc[0] == np.float32
        return self.outputs


def _definition(task: dict, report: list[str]) -> PipelineDefinition:
    tree = DEFINITIONS["fraud"].model_dump()
    primary = report[0]
    tree.update(task=task, metrics={"primary": primary, "direction": TASK_METRICS[task["type"]][primary],
                                    "report": report[1:]})
    tree["validation"]["label_rate"] = None
    return PipelineDefinition.model_validate(tree)


def _split(monkeypatch, labels) -> None:
    frame = pd.DataFrame({"x": np.arange(len(labels), dtype="int64"), "y": labels})
    manifest = {"feature_columns": ["x"], "label_column": "y"}
    monkeypatch.setattr(evaluation, "read_split", lambda uri, split, settings=None: (frame, manifest))


def test_regression_metrics(monkeypatch):
    _split(monkeypatch, np.array([1.0, 2.0, 3.0, 4.0]))
    definition = _definition({"type": "regression"}, ["rmse", "mae", "r2"])
    scores = evaluation.score_model(_Served(np.array([[1.0], [2.0], [3.0], [6.0]])), "s", definition)
    assert scores == pytest.approx({"test_rmse": 1.0, "test_mae": 0.5, "test_r2": 1 - 4 / 5, "test_rows": 4})


def test_binary_metrics_from_probabilities(monkeypatch):
    _split(monkeypatch, np.array([0, 0, 1, 1]))
    definition = _definition({"type": "binary"}, list(TASK_METRICS["binary"]))
    scores = evaluation.score_model(_Served(np.array([0.1, 0.6, 0.4, 0.9])), "s", definition)
    assert scores["test_roc_auc"] == pytest.approx(0.75)
    assert scores["test_accuracy"] == pytest.approx(0.5)
    expected_log_loss = -np.mean(np.log([0.9, 0.4, 0.4, 0.9]))
    assert scores["test_log_loss"] == pytest.approx(expected_log_loss)
    assert set(scores) == {f"test_{m}" for m in TASK_METRICS["binary"]} | {"test_rows"}


def test_multiclass_metrics_from_class_probabilities(monkeypatch):
    _split(monkeypatch, np.array([0, 1, 2, 2]))
    definition = _definition({"type": "multiclass", "num_classes": 3}, list(TASK_METRICS["multiclass"]))
    proba = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    scores = evaluation.score_model(_Served(proba), "s", definition)
    assert scores["test_accuracy"] == pytest.approx(0.75)
    assert scores["test_macro_f1"] == pytest.approx(np.mean([2 / 3, 1.0, 2 / 3]))
    assert scores["test_log_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.7, 0.7, 0.2])))


def test_every_task_metric_has_an_implementation():
    implemented = {task: set(fns) for task, fns in evaluation._metric_functions().items()}
    assert implemented == {task: set(metrics) for task, metrics in TASK_METRICS.items()}


@pytest.mark.parametrize("module", ["pipeline", "registry", "governance", "lineage", "arrival", "demo"])
def test_generic_modules_name_no_example(module):
    source = (PROJECT_ROOT / "plugins" / "ctrain" / f"{module}.py").read_text().lower()
    for word in ("fraud", "roc_auc", "transactions", "delivery", "rmse"):
        assert word not in source, f"ctrain/{module}.py names {word!r}; it belongs in a pipeline definition"


# ---- intervals of a difference on the same rows (ctrain.uncertainty) ----------------------------
def _paired_world(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype("int64")
    a = y * 1.0 + rng.normal(0, 1, n)
    return y, a, a + rng.normal(0, 0.5, n)


def test_delong_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    from ctrain.uncertainty import delong_components

    y, a, _ = _paired_world(3000)
    rounded = np.round(a, 1)  # many ties
    aucs, _, _ = delong_components(y, np.vstack([a, rounded]))
    assert aucs == pytest.approx([roc_auc_score(y, a), roc_auc_score(y, rounded)], abs=1e-12)


def test_delong_and_the_paired_bootstrap_agree():
    from ctrain.uncertainty import delong, paired_bootstrap

    y, a, b = _paired_world(5000)
    d = delong(y, a, b)
    boot = paired_bootstrap("roc_auc", y, a, b, samples=2000, seed=1)
    assert d.estimate == pytest.approx(boot.estimate, abs=1e-12)
    assert d.low == pytest.approx(boot.low, abs=0.003) and d.high == pytest.approx(boot.high, abs=0.003)
    assert d.low < d.estimate < d.high


def test_delong_variance_of_one_auc_matches_the_bootstrap_spread():
    from ctrain.uncertainty import auc_with_interval, bootstrap_interval

    y, a, _ = _paired_world(4000, seed=2)
    d, boot = auc_with_interval(y, a), bootstrap_interval("roc_auc", y, a, samples=2000, seed=0)
    assert d.estimate == pytest.approx(boot.estimate)
    assert (d.high - d.low) == pytest.approx(boot.high - boot.low, rel=0.1)


@pytest.mark.parametrize(("metric", "task"), [("accuracy", "binary"), ("log_loss", "binary"), ("rmse", "regression"),
                                              ("mae", "regression"), ("r2", "regression")])
def test_weighted_bootstrap_metrics_equal_the_metric_on_the_resampled_rows(metric, task):
    """The vectorized bootstrap (counts x per-row terms) is the metric of the resampled rows themselves."""
    from ctrain.uncertainty import _metric

    rng = np.random.default_rng(0)
    n = 500
    y = (rng.random(n) < 0.3).astype("int64") if task == "binary" else rng.normal(10, 3, n)
    p = rng.random(n) if task == "binary" else y + rng.normal(0, 1, n)
    rows = rng.integers(0, n, n)
    counts = np.bincount(rows, minlength=n).astype("float32")[None, :]
    expected = evaluation.metric_function(task, metric)(y[rows], p[rows])
    assert _metric(metric, y, p)(counts)[0] == pytest.approx(expected, rel=1e-5)  # float32 sums


def test_multiclass_bootstrap_uses_the_class_probabilities():
    from ctrain.uncertainty import paired_bootstrap

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    good = np.eye(3)[y] * 0.6 + 0.4 / 3
    bad = np.full((2000, 3), 1 / 3)
    ci = paired_bootstrap("accuracy", y, good, bad, samples=300)
    assert ci.low > 0.5  # always right vs a third right (argmax of ties is class 0)
    assert paired_bootstrap("log_loss", y, good, bad, samples=300).high < 0
