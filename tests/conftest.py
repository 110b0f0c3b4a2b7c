"""Shared pytest fixtures. Names say which part of the pipeline they serve (``dp_`` = data plane)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from ctrain.settings import Settings

from support import DP_DAYS, DP_ROWS_PER_DAY, DP_START, pipeline_settings  # the tiny world (support.py)


def dp_settings_for(home: Path) -> Settings:
    """Settings with every data-plane path under ``home`` (explicit values, so env vars cannot leak in)."""
    from ctrain.settings import Settings

    return Settings(home=home, data_root=str(home / "data"), object_root=f"file://{home / 'objects'}")


@pytest.fixture(scope="session")
def dp_make_settings():
    """The :func:`dp_settings_for` factory, for fixtures and tests that need several homes."""
    return dp_settings_for


@pytest.fixture
def dp_settings(tmp_path: Path) -> Settings:
    """Empty ctrain home for one test: no data, no registry."""
    return dp_settings_for(tmp_path / "home")


@pytest.fixture
def dp_generated(dp_settings: Settings) -> Settings:
    """A ctrain home with the tiny world generated and the feature repo applied (function scope: mutable)."""
    from ctrain import featurestore
    from ctrain_examples import fraud

    fraud.generate(dp_settings.resolved_data_root, days=DP_DAYS, start=DP_START, seed=0,
                     rows_per_day=DP_ROWS_PER_DAY, n_customers=300, n_merchants=40)
    featurestore.apply_feature_repo(dp_settings)
    return dp_settings


@pytest.fixture(scope="session")
def dp_snapshot(tmp_path_factory: pytest.TempPathFactory):
    """(settings, SnapshotInfo) of the tiny world, built once per session. Read-only: do not mutate."""
    from ctrain import featurestore
    from ctrain import snapshot as snapshots
    from ctrain_examples import fraud

    settings = dp_settings_for(tmp_path_factory.mktemp("dp_snapshot") / "home")
    fraud.generate(settings.resolved_data_root, days=DP_DAYS, start=DP_START, seed=0,
                     rows_per_day=DP_ROWS_PER_DAY, n_customers=300, n_merchants=40)
    featurestore.apply_feature_repo(settings)
    return settings, snapshots.build_snapshot(settings, val_days=1, test_days=1)


# The delivery-ETA example (a regression on other entities and columns): 20 days x 400 deliveries, enough
# for its definition's row floors (2,000 rows, 200 per split) with the default 6/7/7-day split.
DP_ETA_DAYS = 20
DP_ETA_ROWS_PER_DAY = 400


def dp_eta_settings_for(home: Path) -> Settings:
    """Like :func:`dp_settings_for`, for the delivery_eta pipeline."""
    from ctrain.settings import Settings

    return Settings(home=home, data_root=str(home / "data"), object_root=f"file://{home / 'objects'}",
                    pipeline="delivery_eta")


@pytest.fixture(scope="session")
def dp_eta_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated delivery-ETA data root (read-only: copy it to change it)."""
    from datetime import date

    from ctrain_examples import delivery_eta

    out = tmp_path_factory.mktemp("dp_eta_world") / "data"
    delivery_eta.generate(out, days=DP_ETA_DAYS, start=date.fromisoformat(DP_START), seed=0,
                          rows_per_day=DP_ETA_ROWS_PER_DAY)
    return out


@pytest.fixture(scope="session")
def dp_eta_snapshot(tmp_path_factory: pytest.TempPathFactory, dp_eta_world: Path):
    """(settings, SnapshotInfo) of the delivery-ETA world through Feast, built once. Read-only."""
    import shutil

    from ctrain import featurestore
    from ctrain import snapshot as snapshots

    settings = dp_eta_settings_for(tmp_path_factory.mktemp("dp_eta_snapshot") / "home")
    shutil.copytree(dp_eta_world, settings.resolved_data_root)
    featurestore.apply_feature_repo(settings)
    return settings, snapshots.build_snapshot(settings)


@pytest.fixture
def dp_eta_copy(tmp_path: Path, dp_eta_world: Path) -> Settings:
    """delivery_eta settings on a private, mutable copy of the generated world (feature repo not applied)."""
    import shutil

    settings = dp_eta_settings_for(tmp_path / "eta_home")
    shutil.copytree(dp_eta_world, settings.resolved_data_root)
    return settings


GOV_TEST_POLICY = """\
version: gov-test-v1
floors: {roc_auc: 0.55}
non_inferiority: {metric: roc_auc, margin: 0.05, grey_width: 0.01}
slices:
  - {column: amount, bins: [0, 50, .inf], metric: roc_auc, floor: 0.3, max_drop: 0.5, min_rows: 100}
max_model_bytes: 10000000
latency: {max_p95_ms: 5000, batch_rows: 500, batches: 5}
"""


@pytest.fixture(scope="session")
def gov_two_versions(tmp_path_factory: pytest.TempPathFactory):
    """The fraud pipeline's steps twice on one real snapshot (real Feast, GX, 2-process torchrun, MLflow on
    SQLite): v1 approved and promoted (no champion), then v2 (another learning rate) evaluated against v1
    on the same test rows and governed. Returns (settings, steps of the first, steps of the second), the
    steps as dicts of each step's result; the second's ``decision`` is the GovernanceRejected if it was
    refused. Read-only."""
    from ctrain import pipeline
    from ctrain.errors import GovernanceRejected
    from ctrain_examples import fraud

    home = tmp_path_factory.mktemp("gov") / "home"
    settings = pipeline_settings(home, "fraud")
    # A policy for a 2-epoch model on 20 small days (the example's is for the demo's data).
    (settings.pipelines_dir / settings.definition.governance.policy).write_text(GOV_TEST_POLICY)
    fraud.generate(settings.resolved_data_root, days=20, start=DP_START, seed=0, rows_per_day=400)
    snapshot = pipeline.build_dataset(settings)
    validation = pipeline.validate(settings, snapshot)
    runs = []
    for n, overrides in enumerate(({"train.epochs": 2}, {"train.epochs": 2, "optimizer.lr": 0.001}), start=1):
        dag_run = f"manual__gov{n}"
        training = pipeline.train(settings, snapshot, validation, settings.definition.dag_id, dag_run, overrides)
        evaluation = pipeline.evaluate(settings, training, snapshot)
        registration = pipeline.register(settings, training, snapshot, validation, dag_run)
        try:
            decision = pipeline.govern(settings, evaluation)
        except GovernanceRejected as exc:
            decision = exc
        steps = {"snapshot": snapshot, "validation": validation, "training": training, "evaluation": evaluation,
                 "registration": registration, "decision": decision}
        if n == 1:
            steps["promotion"] = pipeline.promote(settings, registration, evaluation, decision, dag_run)
        runs.append(steps)
    return settings, runs[0], runs[1]
