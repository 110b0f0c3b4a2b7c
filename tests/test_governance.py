"""Promotion policy: every rule can say yes and no, and says why, in the primary metric's direction."""

from __future__ import annotations

import pytest

from ctrain.definition import PipelineDefinition, load_all
from ctrain.governance import Policy, decide
from ctrain.settings import PROJECT_ROOT

DEFINITIONS = load_all(PROJECT_ROOT / "pipelines")
HIGHER = Policy(version="auc-v1", metric="test_roc_auc", direction="higher", floor=0.80, max_regression=0.005)
LOWER = Policy(version="rmse-v1", metric="test_rmse", direction="lower", floor=6.0, max_regression=0.05)


def test_first_model_judged_on_the_floor_alone():
    d = decide(HIGHER, {"test_roc_auc": 0.86}, None)
    assert d.approved
    assert d.metrics_compared == {"metric": "test_roc_auc", "challenger": 0.86, "champion": None}
    assert any("no champion yet" in r for r in d.reasons)


def test_below_floor_is_rejected_with_the_numbers():
    d = decide(HIGHER, {"test_roc_auc": 0.79}, None)
    assert not d.approved
    assert "test_roc_auc=0.7900 below floor 0.8000" in d.reasons[0]


def test_regression_against_champion_is_rejected():
    d = decide(HIGHER, {"test_roc_auc": 0.85}, {"test_roc_auc": 0.86})
    assert not d.approved
    assert any("regresses vs champion" in r for r in d.reasons)


def test_small_noise_against_champion_is_tolerated():
    d = decide(HIGHER, {"test_roc_auc": 0.857}, {"test_roc_auc": 0.86})
    assert d.approved
    assert d.policy_version == "auc-v1"


def test_missing_metric_is_rejected():
    d = decide(HIGHER, {}, None)
    assert not d.approved and d.reasons == ["challenger has no test_roc_auc"]


@pytest.mark.parametrize(("score", "approved"), [(5.9, True), (6.0, True), (6.1, False)])
def test_lower_is_better_floor_is_a_ceiling(score, approved):
    d = decide(LOWER, {"test_rmse": score}, None)
    assert d.approved is approved
    assert ("above floor" in d.reasons[0]) is not approved


@pytest.mark.parametrize(("score", "approved"), [(3.0, True), (3.04, True), (3.06, False)])
def test_lower_is_better_regression_is_an_increase(score, approved):
    d = decide(LOWER, {"test_rmse": score}, {"test_rmse": 3.0})
    assert d.approved is approved


@pytest.mark.parametrize("definition", DEFINITIONS.values(), ids=lambda d: d.name)
def test_policy_comes_from_the_definition(definition: PipelineDefinition):
    policy = Policy.from_definition(definition)
    assert (policy.version, policy.metric, policy.direction, policy.floor, policy.max_regression) == (
        definition.governance.version, definition.primary_test_metric, definition.metrics.direction,
        definition.governance.floor, definition.governance.max_regression)
    assert Policy.from_definition(definition, floor=0.5).floor == 0.5
