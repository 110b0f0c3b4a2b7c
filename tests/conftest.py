"""Shared pytest fixtures. Names say which part of the pipeline they serve (``dp_`` = data plane)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from ctrain.settings import Settings

from support import DP_DAYS, DP_ROWS_PER_DAY, DP_START  # the tiny world (support.py)


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
