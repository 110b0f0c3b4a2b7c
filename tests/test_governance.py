"""Promotion policy as code: the policy files, every rule saying yes and no with its numbers, intervals that
keep noise from counting as "better", and the decision recorded on the version, the run and the audit
trail for approvals and rejections alike (real pipeline steps, MLflow on SQLite)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ctrain import governance
from ctrain.definition import load_all
from ctrain.errors import ConfigError, GovernanceRejected
from ctrain.governance import Evidence, LoadedPolicy, Policy, decide, load_policy
from ctrain.settings import PROJECT_ROOT

PIPELINES = PROJECT_ROOT / "pipelines"
DEFINITIONS = load_all(PIPELINES)
FRAUD, ETA = DEFINITIONS["fraud"], DEFINITIONS["delivery_eta"]
LINEAGE = {t: "x" for t in governance.LINEAGE_TAGS} | {"image": "local"}


def _policy(tree: dict) -> LoadedPolicy:
    return LoadedPolicy(Policy.model_validate(tree), Path("test.yaml"), "0" * 64)


def _binary_world(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (about 10 % positive) and a champion's scores with a ROC AUC near 0.8."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype("int64")
    return y, 1 / (1 + np.exp(-(1.2 * y + rng.normal(0, 1, n) - 2)))


def _frame(y, challenger, champion, **columns) -> pd.DataFrame:
    return pd.DataFrame({"label": y, "challenger": challenger, "champion": champion, **columns})


def _evidence(frame: pd.DataFrame, definition=FRAUD, **changes) -> Evidence:
    from ctrain.evaluation import scores

    y = frame["label"].to_numpy()
    values = {"predictions": frame, "lineage": LINEAGE, "validation_success": True,
              "challenger": scores(definition, y, frame["challenger"].to_numpy()),
              "champion": scores(definition, y, frame["champion"].to_numpy())}
    return Evidence(**{**values, **changes})


def _rule(decision, name: str):
    return next(r for r in decision.rules if r.name == name)


# ---- the policy files -----------------------------------------------------------------------------
@pytest.mark.parametrize("definition", DEFINITIONS.values(), ids=lambda d: d.name)
def test_every_pipeline_has_a_policy_file_recorded_by_version_and_sha256(definition):
    loaded = load_policy(definition, PIPELINES)
    assert loaded.path == PIPELINES / "policies" / f"{definition.name}.yaml"
    assert loaded.sha256 == hashlib.sha256(loaded.path.read_bytes()).hexdigest()
    assert definition.metrics.primary in loaded.policy.floors
    assert loaded.policy.non_inferiority is not None and loaded.policy.slices


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update(colour="blue"), "colour: Extra inputs are not permitted"),
        (lambda t: t["non_inferiority"].update(margin=-1), "non_inferiority.margin: Input should be greater"),
        (lambda t: t["floors"].update(rmse=3.0), "metric(s) rmse not computed for task 'binary'"),
        (lambda t: t["non_inferiority"].update(metric="pr_auc"), "non_inferiority.metric pr_auc has no paired"),
        (lambda t: t["slices"][0].update(bins=[5, 1]), "slices.0: bins [5.0, 1.0] must be strictly ascending"),
        (lambda t: t.pop("version"), "version: Field required"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_file_and_the_key(tmp_path: Path, change, message: str):
    tree = yaml.safe_load((PIPELINES / "policies" / "fraud.yaml").read_text())
    change(tree)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "fraud.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"policy .*policies/fraud.yaml \(governance.policy of pipeline 'fraud'\)"
                       ) as refused:
        load_policy(FRAUD, tmp_path)
    assert message in str(refused.value)


def test_a_missing_policy_file_fails_the_definition_at_load(tmp_path: Path):
    from ctrain.definition import load_file

    (tmp_path / "fraud.yaml").write_bytes((PIPELINES / "fraud.yaml").read_bytes())
    with pytest.raises(ConfigError, match="cannot read .*create it or fix governance.policy"):
        load_file(tmp_path / "fraud.yaml")


def test_delong_only_for_the_auc(tmp_path: Path):
    tree = yaml.safe_load((PIPELINES / "policies" / "delivery_eta.yaml").read_text())
    tree["non_inferiority"]["method"] = "delong"
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "delivery_eta.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="method delong applies to roc_auc, not rmse; use bootstrap"):
        load_policy(ETA, tmp_path)


def test_policy_reference_table_is_current():
    from ctrain.definition import markdown_table

    assert markdown_table(Policy) in (PIPELINES / "README.md").read_text()


# ---- floors ---------------------------------------------------------------------------------------
def test_floors_in_each_metrics_direction_and_the_param_replaces_the_primarys():
    policy = _policy({"version": "v", "floors": {"roc_auc": 0.8, "log_loss": 0.3}, "require_lineage": False,
                      "require_validation": False})
    evidence = Evidence(challenger={"test_roc_auc": 0.79, "test_log_loss": 0.31}, champion=None)
    d = decide(policy, FRAUD, evidence)
    assert not d.approved
    assert _rule(d, "floor:test_roc_auc").reason == "test_roc_auc=0.7900 below floor 0.8000 (higher is better)"
    assert _rule(d, "floor:test_log_loss").reason == "test_log_loss=0.3100 above ceiling 0.3000 (lower is better)"
    assert _rule(d, "floor:test_log_loss").numbers == {"value": 0.31, "bound": 0.3}
    d = decide(policy, FRAUD, evidence, primary_floor=0.75)
    assert _rule(d, "floor:test_roc_auc").passed and not _rule(d, "floor:test_log_loss").passed


def test_first_model_has_no_comparison_and_is_judged_on_the_rest():
    policy = load_policy(FRAUD, PIPELINES)
    d = decide(policy, FRAUD, Evidence(challenger={"test_roc_auc": 0.9, "test_pr_auc": 0.5}, champion=None,
                                       lineage=LINEAGE, validation_success=True, model_bytes=1000,
                                       latency_p95_ms=1.0, predictions=None))
    assert _rule(d, "non_inferiority").passed
    assert "no champion" in _rule(d, "non_inferiority").reason
    assert not _rule(d, "slice:amount").passed  # no per-row predictions: a slice cannot be judged, so no
    assert d.policy_version == "fraud-v2" and d.policy_sha256 == policy.sha256


# ---- non-inferiority with uncertainty ------------------------------------------------------------
NI = {"version": "ni", "non_inferiority": {"metric": "roc_auc", "margin": 0.005}, "require_lineage": False,
      "require_validation": False}


def _noise_challenger(y, champion, scale: float, want) -> np.ndarray:
    """The champion's scores plus noise of ``scale``: the first seed whose point difference ``want`` accepts."""
    from sklearn.metrics import roc_auc_score

    base = roc_auc_score(y, champion)
    for seed in range(200):
        noisy = champion + np.random.default_rng(100 + seed).normal(0, scale, len(y))
        if want(roc_auc_score(y, noisy) - base):
            return noisy
    raise AssertionError("no seed gave the wanted difference")


def test_a_challenger_better_by_noise_alone_is_not_called_better():
    y, champion = _binary_world()
    challenger = _noise_challenger(y, champion, 0.02, lambda diff: diff > 0)  # a higher point estimate
    frame = _frame(y, challenger, champion)
    d = decide(_policy(NI), FRAUD, _evidence(frame))
    rule = _rule(d, "non_inferiority")
    assert rule.numbers["estimate"] > 0 and rule.numbers["low"] < 0 < rule.numbers["high"]
    assert rule.numbers["better"] is False and rule.numbers["method"] == "delong"
    assert "not significantly" in rule.reason and f"[{rule.numbers['low']:+.4f}, " in rule.reason
    assert rule.passed and d.approved  # non-inferior, which is all this policy asks
    superiority = {**NI, "non_inferiority": {**NI["non_inferiority"], "require_superiority": True}}
    d = decide(_policy(superiority), FRAUD, _evidence(frame))
    assert not d.approved and "fails superiority" in _rule(d, "non_inferiority").reason


def test_a_worse_challenger_within_the_old_max_regression_is_rejected():
    """Point difference -0.001..-0.005 (the old rule, max_regression 0.005, said yes); the interval says it
    may be much worse."""
    y, champion = _binary_world(n=2000)
    challenger = _noise_challenger(y, champion, 0.05, lambda diff: -0.005 < diff < -0.001)
    d = decide(_policy(NI), FRAUD, _evidence(_frame(y, challenger, champion)))
    rule = _rule(d, "non_inferiority")
    assert -0.005 < rule.numbers["estimate"] < 0 and rule.numbers["low"] < -0.005
    assert not rule.passed and not d.approved


def test_lower_is_better_uses_the_upper_bound_with_a_seeded_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.normal(20, 5, 3000)
    champion = y + rng.normal(0, 3, 3000)
    worse = y + rng.normal(0, 3.6, 3000)  # RMSE about 0.6 minutes worse
    policy = _policy({**NI, "non_inferiority": {"metric": "rmse", "margin": 0.1, "samples": 500, "seed": 3}})
    frame = _frame(y, worse, champion)
    d = decide(policy, ETA, _evidence(frame, ETA))
    rule = _rule(d, "non_inferiority")
    assert rule.numbers["method"] == "paired_bootstrap" and rule.numbers["samples"] == 500
    assert rule.numbers["low"] > 0.1 and not rule.passed and "worse than the champion" in rule.reason
    assert decide(policy, ETA, _evidence(frame, ETA)).rules[0].numbers == rule.numbers  # seeded
    d = decide(policy, ETA, _evidence(_frame(y, champion, worse), ETA))  # swapped: clearly better
    assert _rule(d, "non_inferiority").passed and _rule(d, "non_inferiority").numbers["better"]


def test_grey_zone_when_the_bound_is_within_its_width_and_it_asks_for_approval():
    from ctrain.definition import Approval
    from ctrain.pipeline import approval_needed

    y, champion = _binary_world()
    frame = _frame(y, champion, champion)  # identical: interval [0, 0]
    grey = {**NI, "non_inferiority": {**NI["non_inferiority"], "grey_width": 0.006}}
    d = decide(_policy(grey), FRAUD, _evidence(frame))
    assert d.approved and d.grey_zone and _rule(d, "non_inferiority").grey_zone
    assert not decide(_policy(NI), FRAUD, _evidence(frame)).grey_zone
    assert approval_needed(Approval(required="grey_zone"), {}, grey_zone=d.grey_zone)["required"] is True


# ---- slices ---------------------------------------------------------------------------------------
def test_an_aggregate_gain_cannot_hide_a_segment_that_got_worse():
    y, champion = _binary_world(n=6000)
    amount = np.random.default_rng(1).choice([10.0, 60.0, 300.0], 6000, p=[0.6, 0.3, 0.1])
    challenger = champion.copy()
    small = amount < 50
    challenger[small] = np.where(y[small] == 1, champion[small] + 0.3, champion[small])  # much better here
    big = amount >= 200
    challenger[big] = np.random.default_rng(2).random(big.sum())  # random in the top band
    policy = _policy({**NI, "slices": [{"column": "amount", "bins": [0, 50, 200, float("inf")], "metric": "roc_auc",
                                        "max_drop": 0.05, "min_rows": 300}]})
    d = decide(policy, FRAUD, _evidence(_frame(y, challenger, champion, amount=amount)))
    assert _rule(d, "non_inferiority").passed and _rule(d, "non_inferiority").numbers["better"]
    rule = _rule(d, "slice:amount")
    assert not rule.passed and not d.approved
    by_segment = {s["segment"]: s for s in rule.numbers["segments"]}
    assert set(by_segment) == {"[0, 50)", "[50, 200)", ">= 200"}
    assert by_segment[">= 200"]["drop"] > 0.05 and ">= 200:" in rule.reason
    assert by_segment["[0, 50)"]["drop"] < 0


def test_small_segments_are_reported_not_judged():
    y, champion = _binary_world(n=1000)
    merchant = np.where(np.arange(1000) < 950, 1, 2)
    policy = _policy({**NI, "slices": [{"column": "merchant_id", "floor": 0.99, "min_rows": 100}]})
    rule = _rule(decide(policy, FRAUD, _evidence(_frame(y, champion, champion, merchant_id=merchant))),
                 "slice:merchant_id")
    segments = {s["segment"]: s for s in rule.numbers["segments"]}
    assert segments["2"] == {"segment": "2", "rows": 50, "judged": False}
    assert segments["1"]["judged"] and not rule.passed  # floor 0.99 on the judged one


# ---- validation, lineage, size, latency ---------------------------------------------------------
def test_validation_lineage_size_and_latency_rules():
    policy = _policy({"version": "v", "max_model_bytes": 1000, "latency": {"max_p95_ms": 10}})
    ok = Evidence(challenger={}, champion=None, lineage=LINEAGE, validation_success=True, model_bytes=1000,
                  latency_p95_ms=9.5)
    assert decide(policy, FRAUD, ok).approved
    bad = Evidence(challenger={}, champion=None, lineage={**LINEAGE, "git_sha": "", "image": "trainer:latest"},
                   validation_success=False, model_bytes=1001, latency_p95_ms=10.5)
    d = decide(policy, FRAUD, bad)
    assert [r.name for r in d.rules if not r.passed] == ["validation", "lineage", "model_size", "latency"]
    assert "missing git_sha" in _rule(d, "lineage").reason and "not pinned by digest" in _rule(d, "lineage").reason
    pinned = {**LINEAGE, "image": "trainer:latest@sha256:" + "a" * 64}
    assert decide(policy, FRAUD, Evidence(**{**ok.__dict__, "lineage": pinned})).approved


# ---- recorded for approvals and rejections (real steps, MLflow on SQLite) ------------------------
@pytest.mark.slow  # two 2-process trainings on a real snapshot (about two minutes, shared with test_modelcard)
def test_decision_recorded_on_version_run_and_audit(gov_two_versions):
    from ctrain import registry, storage

    settings, first, second = gov_two_versions
    client = registry.get_client(settings)
    for n, steps in enumerate((first, second), start=1):
        decision, version = steps["decision"], steps["registration"]["version"]
        assert isinstance(decision, dict), decision
        tags = client.get_model_version(settings.model_name, version).tags
        assert tags["governance.decision"] == ("approve" if decision["approved"] else "reject")
        assert tags["governance.policy_version"] == "gov-test-v1"
        policy_file = settings.pipelines_dir / "policies" / "fraud.yaml"
        assert tags["governance.policy_sha256"] == hashlib.sha256(policy_file.read_bytes()).hexdigest()
        audit = storage.read_json(tags["governance.audit"], settings)
        assert audit["action"] == tags["governance.decision"] and audit["decided_by"] == "policy:gov-test-v1"
        assert audit["details"]["rules"] == decision["rules"] and audit["dag_run_id"] == f"manual__gov{n}"
        run = client.get_run(steps["training"]["mlflow_run_id"])
        assert run.data.tags["governance.decision"] == tags["governance.decision"]
        recorded = json.loads(Path(client.download_artifacts(run.info.run_id, "governance/decision.json",
                                                             str(settings.home))).read_text())
        assert recorded["rules"] == decision["rules"] and recorded["version"] == version
    assert first["evaluation"]["champion"] is None and second["evaluation"]["champion_version"] == "1"


@pytest.mark.slow
def test_the_comparison_is_on_the_same_test_rows_from_the_predictions_file(gov_two_versions):
    from ctrain import storage
    from ctrain.snapshot import load_snapshot
    from ctrain.uncertainty import delong

    settings, first, second = gov_two_versions
    evaluation = second["evaluation"]
    assert evaluation["predictions_uri"].endswith("/evaluation/predictions-vs-v1.parquet")
    import io

    frame = pd.read_parquet(io.BytesIO(storage.read_bytes(evaluation["predictions_uri"], settings)))
    _, splits = load_snapshot(second["snapshot"]["uri"])
    test = splits["test"]
    assert list(frame.columns) == ["label", "challenger", "champion", "amount"]
    assert len(frame) == len(test) and (frame["label"].to_numpy() == test["label"].to_numpy()).all()
    assert (frame["amount"].to_numpy() == test["amount"].to_numpy()).all()
    rule = next(r for r in second["decision"]["rules"] if r["name"] == "non_inferiority")
    ci = delong(frame["label"].to_numpy(), frame["challenger"].to_numpy(), frame["champion"].to_numpy())
    assert (rule["numbers"]["low"], rule["numbers"]["high"]) == pytest.approx((ci.low, ci.high))
    assert rule["numbers"]["estimate"] == pytest.approx(
        evaluation["challenger"]["test_roc_auc"] - evaluation["champion"]["test_roc_auc"])


@pytest.mark.slow
def test_a_rejection_is_recorded_before_raising_and_the_version_stays_challenger(gov_two_versions):
    from ctrain import pipeline, registry, storage

    settings, _, second = gov_two_versions
    with pytest.raises(GovernanceRejected, match=r"FAIL floor:test_roc_auc: test_roc_auc=\S+ below floor 0.9990"):
        pipeline.govern(settings, second["evaluation"], primary_metric_floor=0.999)
    client = registry.get_client(settings)
    version = second["registration"]["version"]
    tags = client.get_model_version(settings.model_name, version).tags
    assert tags["governance.decision"] == "reject"
    assert tags["governance.summary"].startswith("rejected under gov-test-v1: failed floor:test_roc_auc")
    audit = storage.read_json(tags["governance.audit"], settings)
    assert audit["action"] == "reject" and audit["version"] == version and audit["previous_champion"] == "1"
    floor = next(r for r in audit["details"]["rules"] if r["name"] == "floor:test_roc_auc")
    assert floor["passed"] is False and floor["numbers"]["bound"] == 0.999
    assert registry.alias_version(client, settings.model_name, registry.CHALLENGER) == version
    assert registry.alias_version(client, settings.model_name, registry.CHAMPION) == "1"
