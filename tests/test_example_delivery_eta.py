"""The delivery-ETA example (``ctrain_examples.delivery_eta``, ``feature_repo/delivery_eta.py``,
``pipelines/delivery_eta.yaml``): the generator is deterministic and lands the documented layout, its
aggregates only look back, the target is learnable from what is visible at order time, the definition's
thresholds hold on the generated data, and the Feast declarations join it point-in-time correctly."""

from __future__ import annotations

from datetime import date, timedelta
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrain import featurestore
from ctrain.definition import PROJECT_ROOT, load_file
from ctrain.errors import DataError
from ctrain.settings import Settings
from ctrain_examples import delivery_eta as eta

if TYPE_CHECKING:
    from pathlib import Path

START, DAYS, ROWS = date(2026, 1, 1), 20, 400  # the test world the definition's min_rows must admit
DEFINITION = load_file(PROJECT_ROOT / "pipelines" / "delivery_eta.yaml")
COURIER_FEATURES = ["courier_avg_minutes_14d", "courier_deliveries_7d", "courier_tenure_days"]
ZONE_FEATURES = ["zone_congestion_index", "zone_avg_minutes_7d"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated data root (read-only)."""
    out = tmp_path_factory.mktemp("delivery_eta") / "data"
    eta.generate(out, days=DAYS, start=START, seed=0, rows_per_day=ROWS)
    return out


def _read(out: Path, table: str) -> pd.DataFrame:
    return pq.read_table(out / table, partitioning=None).to_pandas()


def _joined(out: Path) -> pd.DataFrame:
    """Each delivery with its courier's and zone's latest aggregate row at order time (Feast-free)."""
    events = _read(out, eta.DELIVERIES).sort_values("ordered_at")
    for table, key in ((eta.COURIER_STATS, "courier_id"), (eta.ZONE_STATS, "zone_id")):
        rows = _read(out, table).drop(columns="created_timestamp").sort_values("event_timestamp")
        events = pd.merge_asof(events, rows, left_on="ordered_at", right_on="event_timestamp", by=key)
        events = events.drop(columns="event_timestamp")
    return events


def test_same_arguments_give_identical_bytes_whatever_the_window(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    written = eta.generate(a, days=3, start=START, seed=7, rows_per_day=50)
    eta.generate(b, days=3, start=START, seed=7, rows_per_day=50)
    eta.generate(c, days=1, start=START + timedelta(days=1), seed=7, rows_per_day=50)
    assert eta.append_day(c, START + timedelta(days=2)) != []
    assert len(written) == 9
    assert all(p.read_bytes() == (b / p.relative_to(a)).read_bytes() for p in written)
    # a day's partitions depend only on the world and the date: the same bytes when generated alone or appended
    later = [p for p in written if "date=2026-01-01" not in str(p)]
    assert all(p.read_bytes() == (c / p.relative_to(a)).read_bytes() for p in later)
    assert eta.generate(a, days=3, start=START, seed=7, rows_per_day=50) == []  # idempotent
    assert eta.main(["--out", str(tmp_path / "cli"), "--days", "1", "--rows-per-day", "50"]) == 0


def test_a_landed_partition_is_immutable(tmp_path: Path) -> None:
    eta.generate(tmp_path, days=2, start=START, seed=0, rows_per_day=50)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.parquet")}
    with pytest.raises(DataError, match="already exist with other content"):
        eta.generate(tmp_path, days=2, start=START, seed=1, rows_per_day=50)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.parquet")} == before
    assert len(eta.generate(tmp_path, days=2, start=START, seed=1, rows_per_day=50, overwrite=True)) == 6


def test_partitions_columns_and_types_are_as_documented(world: Path) -> None:
    for table, schema in eta.SCHEMAS.items():
        parts = sorted((world / table).glob("date=*/part-0.parquet"))
        assert [p.parent.name for p in parts] == [f"date={START + timedelta(days=i)}" for i in range(DAYS)]
        for part in parts:
            assert pq.read_schema(part).remove_metadata() == schema, part
    events = _read(world, eta.DELIVERIES)
    assert pq.read_schema(next((world / eta.DELIVERIES).glob("*/*.parquet"))).field("ordered_at").type == (
        pa.timestamp("us", tz="UTC")
    )
    assert len(events) == DAYS * ROWS and events["delivery_id"].is_unique
    day_of_file = pd.to_datetime(
        pq.ParquetDataset(world / eta.DELIVERIES, partitioning="hive").read().column("date").to_pandas()
    ).dt.date
    assert (events["ordered_at"].dt.date.to_numpy() == day_of_file.to_numpy()).all()  # within its day
    assert (events["minutes"] > 0).all() and (events["distance_km"] > 0).all()
    for table, key, n in ((eta.COURIER_STATS, "courier_id", 300), (eta.ZONE_STATS, "zone_id", 25)):
        rows = _read(world, table)
        assert len(rows) == DAYS * n and not rows.duplicated([key, "event_timestamp"]).any()
        assert (rows["event_timestamp"] == rows["event_timestamp"].dt.floor("D")).all()  # 00:00 UTC
        assert (rows["created_timestamp"] > rows["event_timestamp"]).all()
        assert not rows.isna().any().any()


def test_aggregates_look_only_at_the_days_before(world: Path) -> None:
    events, couriers, zones = (_read(world, t) for t in (eta.DELIVERIES, eta.COURIER_STATS, eta.ZONE_STATS))
    day = pd.Timestamp(START + timedelta(days=DAYS - 1), tz="UTC")
    week = events[(events["ordered_at"] >= day - pd.Timedelta(days=7)) & (events["ordered_at"] < day)]
    row = couriers[couriers["event_timestamp"] == day].set_index("courier_id")
    counts = week.groupby("courier_id").size().reindex(row.index, fill_value=0)
    assert (row["courier_deliveries_7d"] == counts).all()
    zone = zones[zones["event_timestamp"] == day].set_index("zone_id")
    by_zone = week.groupby("zone_id")["minutes"]
    total, count = by_zone.sum().reindex(zone.index, fill_value=0), by_zone.size().reindex(zone.index, fill_value=0)
    shrunk = (total + 3 * week["minutes"].mean()) / (count + 3)  # the documented shrinkage
    np.testing.assert_allclose(zone["zone_avg_minutes_7d"], shrunk, rtol=1e-9)


def test_the_target_is_learnable_from_what_is_visible_at_order_time(world: Path) -> None:
    joined = _joined(world)
    y = joined["minutes"].to_numpy()

    def r2(columns: list[str]) -> float:
        x = np.column_stack([np.ones(len(joined)), joined[columns].to_numpy()])
        residual = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
        return 1 - residual.var() / y.var()

    with_features = r2(["distance_km", *COURIER_FEATURES, *ZONE_FEATURES])
    assert with_features > 0.5
    assert with_features > r2(["distance_km"]) + 0.1  # the Feast features carry signal of their own


def test_the_definition_thresholds_hold_on_generated_data(world: Path) -> None:
    joined = _joined(world)
    validation = DEFINITION.validation
    assert len(joined) >= validation.min_rows and ROWS >= validation.min_rows_per_split
    target = validation.target_range
    assert target is not None and target.min <= joined["minutes"].min() and joined["minutes"].max() <= target.max
    assert sorted(validation.feature_ranges) == sorted(["distance_km", *COURIER_FEATURES, *ZONE_FEATURES])
    for name, bounds in validation.feature_ranges.items():
        assert bounds.min <= joined[name].min() and joined[name].max() <= bounds.max, name
    # the policy's RMSE ceiling separates a constant predictor (RMSE = the std) from a model
    from ctrain.governance import load_policy

    assert joined["minutes"].std() > load_policy(DEFINITION, PROJECT_ROOT / "pipelines").policy.floors["rmse"]


def test_feast_serves_the_days_aggregates_point_in_time(world: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = Settings(home=home, data_root=str(world), object_root=f"file://{home / 'objects'}")
    featurestore.apply_feature_repo(settings)
    store = featurestore.feature_store(settings)
    assert {s.name for s in store.list_feature_services()} >= {"fraud_model_v1", DEFINITION.feature_service}
    service = store.get_feature_service(DEFINITION.feature_service)
    assert [f.name for p in service.feature_view_projections for f in p.features] == [
        *COURIER_FEATURES, *ZONE_FEATURES
    ]
    events = _read(world, eta.DELIVERIES)
    day = pd.Timestamp(START + timedelta(days=5), tz="UTC")
    sample = events[events["ordered_at"].dt.floor("D") == day].iloc[[0, 7, -1]]  # first and last of the day
    entity_df = sample[["delivery_id", "courier_id", "zone_id", "ordered_at"]].reset_index(drop=True)
    got = store.get_historical_features(entity_df=entity_df, features=service).to_df().sort_values("delivery_id").reset_index(drop=True)
    couriers = _read(world, eta.COURIER_STATS).set_index(["event_timestamp", "courier_id"])
    expected = couriers.loc[[(day, c) for c in got["courier_id"]], COURIER_FEATURES].reset_index(drop=True)
    pd.testing.assert_frame_equal(got[COURIER_FEATURES], expected, check_dtype=False)
    for other in (day - pd.Timedelta(days=1), day + pd.Timedelta(days=1)):  # neither stale nor leaked
        rows = couriers.loc[[(other, c) for c in got["courier_id"]], "courier_avg_minutes_14d"]
        assert (got["courier_avg_minutes_14d"].to_numpy() != rows.to_numpy()).all(), other
