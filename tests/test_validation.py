"""ctrain.validation: the GX gate passes clean snapshots and names what is wrong with bad ones."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ctrain import featurestore, validation
from ctrain import snapshot as snapshots
from ctrain.definition import PROJECT_ROOT, load_file
from ctrain.errors import ValidationFailed
from ctrain_examples import fraud

FRAUD = load_file(PROJECT_ROOT / "pipelines" / "fraud.yaml")
SMALL = validation.suite_config(FRAUD)  # the fraud thresholds (1,000 rows, 100 per split) admit the tiny world


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def test_clean_snapshot_passes_and_reports_are_written(dp_snapshot):
    settings, info = dp_snapshot
    report_root = f"{settings.resolved_object_root}/reports"
    report = validation.validate_snapshot(info.uri, report_root, SMALL)
    assert report.success and report.failed == []
    report.raise_for_failure()  # no-op on success
    assert report.dataset_version == info.dataset_version
    assert report.result_id.startswith(info.dataset_version)
    assert report.report_uri.startswith(f"{report_root}/validations/{info.dataset_version}/")
    body = json.loads(_local(report.report_uri).read_text())
    assert body["success"] is True and body["result_id"] == report.result_id
    assert set(body["results"]) == {"snapshot", "train", "val", "test"}
    assert report.statistics["rows"] == 1800
    assert report.statistics["snapshot"]["evaluated_expectations"] >= 30
    assert report.statistics["unsuccessful_expectations"] == 0
    docs = _local(report.docs_uri)
    assert docs.name == "index.html" and "ctrain_snapshot" in docs.read_text()
    assert list(docs.parent.glob("validations/ctrain_snapshot/**/*.html"))


def test_nulls_in_a_feature_partition_fail_the_gate_naming_the_expectation(dp_generated):
    fraud.inject_nulls(dp_generated.resolved_data_root, fraud.CUSTOMER_STATS, "2026-01-03", 0.3,
                         columns=["customer_chargeback_rate_90d"])
    info = snapshots.build_snapshot(dp_generated, val_days=1, test_days=1)
    report = validation.validate_snapshot(info.uri, f"{dp_generated.resolved_object_root}/reports", SMALL)
    assert not report.success
    assert len(report.failed) == 1
    assert "expect_column_values_to_not_be_null(column=customer_chargeback_rate_90d)" in report.failed[0]
    assert report.failed[0].startswith("[snapshot]")
    with pytest.raises(ValidationFailed) as err:
        report.raise_for_failure()
    assert err.value.failed == report.failed and err.value.report_uri == report.report_uri
    assert "customer_chargeback_rate_90d" in str(err.value) and report.report_uri in str(err.value)
    assert json.loads(_local(report.report_uri).read_text())["success"] is False


def test_thresholds_name_the_row_count_and_label_rate_checks(dp_snapshot):
    settings, info = dp_snapshot
    strict = replace(SMALL, min_rows=10_000, min_rows_per_split=400, label_rate=(0.2, 0.5))
    report = validation.validate_snapshot(info.uri, f"{settings.resolved_object_root}/reports", strict)
    failed = "\n".join(report.failed)
    assert "[snapshot] expect_table_row_count_to_be_between(min_value=10000" in failed
    assert "[val] expect_table_row_count_to_be_between(min_value=400" in failed
    assert "[train] expect_table_row_count_to_be_between" not in failed  # 1200 rows >= 400
    for split in ("train", "val", "test"):  # label rate ~3 %, below 0.2 in every split
        line = next(f for f in report.failed if f.startswith(f"[{split}] expect_column_mean_to_be_between"))
        assert "column=label" in line and "min_value=0.2" in line and "observed 0.0" in line
    # The snapshot suite leaves label rate to the split suite (per-split bounds imply the overall ones).
    assert "[snapshot] expect_column_mean_to_be_between" not in failed


# ----------------------------------------------------------------------------- drift and poisoning guard
# A world big enough for stable distributions: reference = the champion's snapshot (12 days); each
# scenario lands 3 more days (optionally poisoned) and builds the snapshot of the latest 12 days, whose
# test split is exactly the 3 new days.
DRIFT_WORLD = {"rows_per_day": 800, "n_customers": 500, "n_merchants": 100}
NEW_DAYS = ["2026-01-13", "2026-01-14", "2026-01-15"]
DRIFT_CFG = SMALL


@pytest.fixture(scope="module")
def dp_drift_reference(tmp_path_factory, dp_make_settings):
    settings = dp_make_settings(tmp_path_factory.mktemp("dp_drift") / "home")
    fraud.generate(settings.resolved_data_root, days=12, start="2026-01-01", **DRIFT_WORLD)
    featurestore.apply_feature_repo(settings)
    return settings, snapshots.build_snapshot(settings, val_days=3, test_days=3)


def _land_new_days(reference, settings, **knobs):
    """Copy the reference world into the empty home ``settings``, land NEW_DAYS, build and validate."""
    import shutil

    ref_settings, ref = reference
    shutil.copytree(ref_settings.resolved_data_root, settings.resolved_data_root)
    for day in NEW_DAYS:
        fraud.append_day(settings.resolved_data_root, day, **knobs)
    featurestore.apply_feature_repo(settings)
    snap = snapshots.build_snapshot(settings, start="2026-01-04", val_days=3, test_days=3)
    report = validation.validate_snapshot(snap.uri, f"{settings.resolved_object_root}/reports", DRIFT_CFG,
                                          reference_uri=ref.uri)
    return snap, report


def _kl(report, column):
    body = json.loads(_local(report.report_uri).read_text())
    (er,) = [r for r in body["results"]["newest"]["results"] if r["expectation_config"]["kwargs"]["column"] == column]
    return er["result"]["observed_value"]


def test_clean_new_days_pass_the_drift_suite(dp_drift_reference, dp_settings):
    snap, report = _land_new_days(dp_drift_reference, dp_settings)
    assert report.success, report.failed
    assert snap.manifest["splits"]["test"]["start"] == NEW_DAYS[0]
    assert "newest" in report.statistics and report.statistics["newest"]["evaluated_expectations"] == 9
    assert _kl(report, "customer_avg_amount_30d") < 0.05


def test_shifted_feature_sources_are_caught_by_drift(dp_drift_reference, dp_settings):
    _, report = _land_new_days(dp_drift_reference, dp_settings, feature_shift=0.5)
    assert not report.success
    drifted = [f for f in report.failed if f.startswith("[newest] expect_column_kl_divergence_to_be_less_than")]
    assert any("column=customer_chargeback_rate_90d" in f for f in drifted)
    assert not any("column=amount," in f or "column=label," in f for f in report.failed)  # events untouched
    assert _kl(report, "customer_chargeback_rate_90d") > 0.15


def test_flipped_labels_are_caught_by_drift(dp_drift_reference, dp_settings):
    _, report = _land_new_days(dp_drift_reference, dp_settings, label_flip=0.15)
    assert not report.success
    assert any(f.startswith("[newest] expect_column_kl_divergence_to_be_less_than(column=label")
               for f in report.failed)
    assert not any("column=customer_" in f for f in report.failed)  # features untouched


def test_poisoning_too_small_for_drift_is_stopped_by_governance_on_the_holdout(dp_drift_reference, dp_settings):
    """2 % flipped labels pass every data check; the holdout metric then fails the promotion policy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ctrain.governance import Evidence, decide, load_policy

    snap, report = _land_new_days(dp_drift_reference, dp_settings, label_flip=0.02)
    assert report.success, report.failed  # too small for the gate
    cols = snap.manifest["feature_columns"]
    _, ref_frames = snapshots.load_snapshot(dp_drift_reference[1].uri)
    _, new_frames = snapshots.load_snapshot(snap.uri)

    def fit(frame):
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(
            np.log1p(frame[cols]), frame["label"])

    def auc(model, frame):
        return roc_auc_score(frame["label"], model.predict_proba(np.log1p(frame[cols]))[:, 1])

    champion, challenger = fit(ref_frames["train"]), fit(new_frames["train"])
    assert auc(champion, ref_frames["test"]) > 0.8  # the same kind of model is fine on clean data
    holdout = new_frames["test"]
    evidence = Evidence(challenger={"test_roc_auc": auc(challenger, holdout)},
                        champion={"test_roc_auc": auc(champion, holdout)})
    decision = decide(load_policy(FRAUD, PROJECT_ROOT / "pipelines"), FRAUD, evidence)
    assert not decision.approved
    assert not next(r for r in decision.rules if r.name == "floor:test_roc_auc").passed
    assert any("below floor" in r for r in decision.reasons)


def test_freshness_of_the_newest_event(dp_snapshot):
    from datetime import UTC, datetime, timedelta

    settings, info = dp_snapshot
    root = f"{settings.resolved_object_root}/reports"
    fresh = validation.suite_config(FRAUD, max_event_age=timedelta(days=1),
                                    freshness_at=datetime(2026, 1, 7, 12, tzinfo=UTC))
    assert validation.validate_snapshot(info.uri, root, fresh).success
    stale = replace(fresh, freshness_at=datetime(2026, 1, 10, tzinfo=UTC))
    report = validation.validate_snapshot(info.uri, root, stale)
    assert [f.split("(")[0] for f in report.failed] == ["[snapshot] expect_column_max_to_be_between"]
    assert "column=event_timestamp" in report.failed[0] and "2026-01-09" in report.failed[0]


# ----------------------------------------------------------------------------- any pipeline: the delivery-ETA example


def test_a_regression_snapshot_passes_its_definitions_gate(dp_eta_snapshot):
    settings, info = dp_eta_snapshot
    cfg = validation.suite_config(settings.definition)
    assert (cfg.task, cfg.target_range, cfg.label_rate, cfg.min_rows) == ("regression", (1.0, 300.0), None, 2000)
    report = validation.validate_snapshot(info.uri, f"{settings.resolved_object_root}/reports", cfg)
    assert report.success, report.failed
    body = json.loads(_local(report.report_uri).read_text())
    checks = {(r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column"),
               str(r["expectation_config"]["kwargs"].get("type_")))
              for r in body["results"]["snapshot"]["results"]}
    assert ("expect_column_values_to_be_of_type", "minutes", "float64") in checks
    assert ("expect_column_values_to_be_between", "minutes", "None") in checks  # the target range
    assert ("expect_column_values_to_be_between", "zone_congestion_index", "None") in checks
    assert not any(c[0] == "expect_column_values_to_be_in_set" for c in checks)
    assert all(len(body["results"][s]["results"]) == 1 for s in ("train", "val", "test"))  # rows only
    # Without a config the gate uses the thresholds of the pipeline named in the manifest.
    default = validation.validate_snapshot(info.uri, f"{settings.resolved_object_root}/reports")
    assert default.success and json.loads(_local(default.report_uri).read_text())["suite_config"]["min_rows"] == 2000


def test_a_target_outside_its_range_fails_the_gate_naming_the_column(dp_eta_copy):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = dp_eta_copy.resolved_data_root / "deliveries" / "date=2026-01-18" / "part-0.parquet"
    t = pq.read_table(path)
    pq.write_table(t.set_column(5, "minutes", pc.negate(t.column("minutes"))), path)  # a sign bug upstream
    featurestore.apply_feature_repo(dp_eta_copy)
    info = snapshots.build_snapshot(dp_eta_copy)
    report = validation.validate_snapshot(info.uri, f"{dp_eta_copy.resolved_object_root}/reports",
                                          validation.suite_config(dp_eta_copy.definition))
    assert not report.success
    assert [f.split("(")[0] for f in report.failed] == ["[snapshot] expect_column_values_to_be_between"]
    assert "column=minutes, min_value=1.0, max_value=300.0" in report.failed[0]
    assert "400 of 8000 rows unexpected" in report.failed[0]
    assert pa.types.is_floating(pq.read_schema(path).field("minutes").type)


def test_regression_drift_bins_the_target_like_a_feature(dp_eta_snapshot, tmp_path):
    """The newest split's target vs the reference's: quantile bins, like a feature; a slowdown is caught."""
    settings, info = dp_eta_snapshot
    cfg = validation.suite_config(settings.definition)
    manifest, frame = snapshots.read_frame(info.uri)
    reference = frame.iloc[:manifest["splits"]["train"]["rows"]]
    (label_exp,) = [e for e in validation.drift_expectations(manifest, reference, cfg) if e.column == "minutes"]
    assert len(label_exp.partition_object["bins"]) == cfg.drift_bins + 1 and label_exp.threshold == cfg.max_label_kl

    def drift_failures(snapshot, docs):
        _, failed, _ = validation.run_suites(manifest, snapshot, cfg, str(tmp_path / docs), reference)
        return [f for f in failed if f.startswith("[newest]")]

    assert drift_failures(frame, "clean") == []
    slower = frame.copy()
    newest = slower.index >= len(slower) - manifest["splits"]["test"]["rows"]
    slower.loc[newest, "minutes"] *= 1.3  # every recent delivery 30 % slower, the features unchanged
    assert [f.split(",")[0] for f in drift_failures(slower, "slower")] == [
        "[newest] expect_column_kl_divergence_to_be_less_than(column=minutes"]


def test_multiclass_labels_are_checked_as_classes():
    import pandas as pd

    cfg = validation.SuiteConfig(task="multiclass", num_classes=4)
    manifest = {"feature_columns": ["x"], "id_column": "id", "label_column": "y", "timestamp_column": "t",
                "entity_columns": ["k"]}
    exps = validation.snapshot_expectations(manifest, cfg)
    (in_set,) = [e for e in exps if type(e).__name__ == "ExpectColumnValuesToBeInSet"]
    assert in_set.column == "y" and in_set.value_set == [0, 1, 2, 3]
    assert [type(e).__name__ for e in validation.split_expectations(manifest, cfg)] == [
        "ExpectTableRowCountToBeBetween"]
    reference = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0] * 5, "y": [0, 0, 1, 2] * 5})  # class 3 never seen
    (label,) = [e for e in validation.drift_expectations(manifest, reference, cfg) if e.column == "y"]
    assert label.partition_object["values"] == [0, 1, 2, 3]
    weights = label.partition_object["weights"]
    assert sum(weights) == pytest.approx(1.0) and weights[0] == pytest.approx(0.5, abs=1e-3) and weights[3] > 0
