"""Promotion policy: every rule can say yes and no, and says why."""

from __future__ import annotations

from ctrain.governance import Policy, decide

POLICY = Policy(min_test_roc_auc=0.80, max_regression=0.005)


def test_first_model_judged_on_the_floor_alone():
    d = decide(POLICY, {"test_roc_auc": 0.86}, None)
    assert d.approved
    assert d.metrics_compared == {"challenger": 0.86, "champion": None}
    assert any("no champion yet" in r for r in d.reasons)


def test_below_floor_is_rejected_with_the_numbers():
    d = decide(POLICY, {"test_roc_auc": 0.79}, None)
    assert not d.approved
    assert "0.7900 below floor 0.8000" in d.reasons[0]


def test_regression_against_champion_is_rejected():
    d = decide(POLICY, {"test_roc_auc": 0.85}, {"test_roc_auc": 0.86})
    assert not d.approved
    assert any("regresses vs champion" in r for r in d.reasons)


def test_small_noise_against_champion_is_tolerated():
    d = decide(POLICY, {"test_roc_auc": 0.857}, {"test_roc_auc": 0.86})
    assert d.approved
    assert d.policy_version == "fraud-v1"


def test_missing_metric_is_rejected():
    d = decide(POLICY, {}, None)
    assert not d.approved and d.reasons == ["challenger has no test_roc_auc"]
