"""The data plane (ctrain.landing, ctrain.featurestore, ctrain.snapshot): point-in-time-correct,
content-addressed, immutable snapshots; bad inputs refused."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrain import featurestore, landing, layout, storage
from ctrain import snapshot as snapshots
from ctrain.errors import ConfigError, DataError
from ctrain_examples import fraud

CONTRACT_KEYS = {
    "dataset_version", "feature_service", "feature_service_hash", "feature_columns", "label_column",
    "id_column", "timestamp_column", "entity_columns", "entity_window", "splits", "source_partitions",
    "schema", "created_at",
}
FEATURES = ["amount", *fraud.FEATURE_TABLES["customer_stats"], *fraud.FEATURE_TABLES["merchant_stats"]]


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _all_rows(uri: str) -> pd.DataFrame:
    _, frames = snapshots.load_snapshot(uri)
    return pd.concat(frames.values(), ignore_index=True)


# ----------------------------------------------------------------------------- snapshot contract


def test_snapshot_matches_the_contract_and_its_hashes(dp_snapshot):
    settings, info = dp_snapshot
    m = info.manifest
    root = _local(info.uri)
    assert CONTRACT_KEYS <= m.keys()
    assert info.created and m["dataset_version"] == info.dataset_version
    assert info.uri == f"{settings.resolved_object_root}/datasets/{info.dataset_version}"
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "test.parquet", "train.parquet", "val.parquet"]
    for split, meta in m["splits"].items():
        data = (root / meta["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], split
        assert pq.read_metadata(root / meta["file"]).num_rows == meta["rows"]
    assert [m["splits"][s]["rows"] for s in ("train", "val", "test")] == [1200, 300, 300]
    assert (m["splits"]["train"]["start"], m["splits"]["train"]["end"]) == ("2026-01-01", "2026-01-04")
    assert (m["splits"]["test"]["start"], m["splits"]["test"]["end"]) == ("2026-01-06", "2026-01-06")
    assert m["entity_window"] == {"start": "2026-01-01", "end": "2026-01-06"}
    assert m["feature_columns"] == FEATURES and m["feature_service"] == "fraud_model_v1"
    assert m["schema"]["transaction_id"] == "int64" and m["schema"]["label"] == "int64"
    assert m["schema"]["event_timestamp"] == "timestamp[us, tz=UTC]"
    assert all(m["schema"][c] == "double" for c in FEATURES)
    tx_parts = [p for p in m["source_partitions"]["partitions"] if p["table"] == "transactions"]
    assert [p["date"] for p in tx_parts] == [f"2026-01-0{i}" for i in range(1, 7)]


def test_splits_are_time_ordered_and_typed(dp_snapshot):
    _, info = dp_snapshot
    _, frames = snapshots.load_snapshot(info.uri)
    assert frames["train"]["event_timestamp"].max() < frames["val"]["event_timestamp"].min()
    assert frames["val"]["event_timestamp"].max() < frames["test"]["event_timestamp"].min()
    df = pd.concat(frames.values())
    assert df["transaction_id"].is_unique
    assert str(df["event_timestamp"].dtype) == "datetime64[us, UTC]"
    assert all(df[c].dtype == np.float64 for c in FEATURES) and df["label"].dtype == np.int64
    assert df[FEATURES].notna().all().all()
    assert abs(df["label"].mean() - info.manifest["label_rate"]) < 1e-6


def test_features_come_from_the_aggregate_row_of_the_events_own_day(dp_snapshot):
    """Point in time on real data: the day-D row (stamped D 00:00) feeds day-D events, never the day-D+1 row."""
    settings, info = dp_snapshot
    df = _all_rows(info.uri)
    df["day"] = df["event_timestamp"].dt.floor("D")
    stats = pd.concat(pq.read_table(p).to_pandas() for p in
                      sorted(settings.resolved_data_root.glob("features/customer_stats/*/*.parquet")))
    expected = df[["customer_id", "day"]].merge(
        stats.rename(columns={"event_timestamp": "day"}), on=["customer_id", "day"], how="left")
    np.testing.assert_array_equal(df["customer_avg_amount_30d"], expected["customer_avg_amount_30d"])


def test_building_again_writes_nothing_and_returns_the_same_version(dp_snapshot):
    settings, info = dp_snapshot
    root = _local(info.uri)
    before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    again = snapshots.build_snapshot(settings, val_days=1, test_days=1)
    assert not again.created
    assert again.dataset_version == info.dataset_version and again.manifest == info.manifest
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before


def test_version_is_a_content_hash_not_a_clock(dp_snapshot, dp_generated):
    """A fresh home with the same data gets the same version; new data gets a new one, the old stays."""
    _, info = dp_snapshot
    first = snapshots.build_snapshot(dp_generated, val_days=1, test_days=1)
    assert first.created and first.dataset_version == info.dataset_version
    fraud.append_day(dp_generated.resolved_data_root, "2026-01-07")
    grown = snapshots.build_snapshot(dp_generated, val_days=1, test_days=1)
    assert grown.created and grown.dataset_version != first.dataset_version
    assert grown.manifest["entity_window"]["end"] == "2026-01-07"
    assert snapshots.read_manifest(first.uri) == first.manifest
    windowed = snapshots.build_snapshot(dp_generated, end="2026-01-06", val_days=1, test_days=1)
    assert windowed.dataset_version == first.dataset_version and not windowed.created


def test_chunked_join_gives_the_same_snapshot(dp_snapshot, dp_generated):
    """The Feast join runs in chunks of events; chunks that straddle split boundaries change nothing."""
    _, info = dp_snapshot
    chunked = snapshots.build_snapshot(dp_generated, val_days=1, test_days=1, chunk_rows=257)
    assert chunked.created and chunked.dataset_version == info.dataset_version
    # (file bytes differ: one parquet row group per chunk; the version hashes the content, not the bytes)
    for split in ("train", "val", "test"):
        for key in ("rows", "label_rate", "start", "end"):
            assert chunked.manifest["splits"][split][key] == info.manifest["splits"][split][key], (split, key)
    pd.testing.assert_frame_equal(_all_rows(chunked.uri), _all_rows(info.uri))


def test_apply_is_idempotent(dp_generated):
    store = featurestore.feature_store(dp_generated)
    # The repo declares every pipeline's objects in one Feast project; the fraud ones are among them.
    assert {"customer_stats", "merchant_stats"} <= {fv.name for fv in store.list_feature_views()}
    _, first_hash = featurestore.feature_service_hash(store, "fraud_model_v1")
    featurestore.apply_feature_repo(dp_generated)
    store = featurestore.feature_store(dp_generated)
    assert featurestore.feature_service_hash(store, "fraud_model_v1")[1] == first_hash
    assert {"customer", "merchant"} <= {e.name for e in store.list_entities()}
    assert (dp_generated.home / "feast" / "registry.db").is_file()
    assert not list(Path(dp_generated.feature_repo).glob("*.db"))  # state never lands in the repo


def _with_definition(settings, **changes):
    """``settings`` whose pipeline definition has ``changes`` (a copy; the original is untouched)."""
    return settings.model_copy(update={"definition": settings.definition.model_copy(update=changes)})


def test_unknown_service_and_bad_window_are_config_errors(dp_generated):
    with pytest.raises(ConfigError, match="need more than"):
        snapshots.build_snapshot(dp_generated, val_days=3, test_days=3)
    with pytest.raises(ConfigError, match="after end"):
        snapshots.build_snapshot(dp_generated, start="2026-01-05", end="2026-01-02")
    with pytest.raises(ConfigError, match="chunk_rows=0"):
        snapshots.build_snapshot(dp_generated, val_days=1, test_days=1, chunk_rows=0)
    with pytest.raises(ConfigError, match="fraud_model_v9"):
        snapshots.build_snapshot(_with_definition(dp_generated, feature_service="fraud_model_v9"),
                                val_days=1, test_days=1)


# ----------------------------------------------------------------------------- point in time, crafted


def _write(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Landed timestamps are microseconds (ctrain.timestamps); pandas' own unit is nanoseconds.
    df = df.astype({c: "datetime64[us, UTC]" for c in df.columns if isinstance(df[c].dtype, pd.DatetimeTZDtype)})
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)


def _ts(s: str) -> pd.Timestamp:
    return pd.Timestamp(s, tz="UTC")


def _feature_rows(key: str, table: str, rows: list[tuple[int, str, str, float]]) -> pd.DataFrame:
    """rows: (entity id, event time, created time, value of every feature of the table)."""
    df = pd.DataFrame({key: [r[0] for r in rows],
                       "event_timestamp": [_ts(r[1]) for r in rows],
                       "created_timestamp": [_ts(r[2]) for r in rows]})
    for col in fraud.FEATURE_TABLES[table]:
        df[col] = [float(r[3]) for r in rows]
    return df


def _craft(data_root: Path) -> None:
    # customer 1: a row per day with value = day number. customer 2: one row on Jan 1 (TTL 2 days).
    # customer 3: two rows with the same event time; the later-created one is the correction.
    cust = _feature_rows("customer_id", "customer_stats", [
        (1, "2026-01-01", "2026-01-01 00:05", 1), (1, "2026-01-02", "2026-01-02 00:05", 2),
        (1, "2026-01-03", "2026-01-03 00:05", 3), (1, "2026-01-04", "2026-01-04 00:05", 4),
        (2, "2026-01-01", "2026-01-01 00:05", 20),
        (3, "2026-01-02", "2026-01-02 00:05", 30), (3, "2026-01-02", "2026-01-02 00:10", 31),
    ])
    merch = _feature_rows("merchant_id", "merchant_stats", [
        (9, f"2026-01-0{d}", f"2026-01-0{d} 00:05", 0.01 * d) for d in range(1, 5)])
    for table, df in (("customer_stats", cust), ("merchant_stats", merch)):
        for day, part in df.groupby(df["event_timestamp"].dt.date):
            _write(fraud.partition_path(data_root, table, day), part)
    events = [  # (transaction_id, customer, event time)
        (1, 1, "2026-01-01 12:00"),                 # -> customer row of Jan 1 (1), not Jan 2 (2)
        (2, 1, "2026-01-01 23:59:59.999999"),       # 1 microsecond before the Jan 2 row: still 1
        (3, 1, "2026-01-02 00:00"),                 # exactly at the Jan 2 row: 2
        (4, 2, "2026-01-02 23:00"),                 # 47 h after customer 2's only row: within TTL -> 20
        (5, 2, "2026-01-03 00:00"),                 # exactly 48 h: TTL bound is inclusive -> 20
        (6, 2, "2026-01-03 01:00"),                 # 49 h: expired -> missing
        (7, 3, "2026-01-02 12:00"),                 # two rows at the same time: later created wins -> 31
        (8, 1, "2026-01-04 08:00"),                 # test split
    ]
    tx = pd.DataFrame({"transaction_id": [e[0] for e in events], "customer_id": [e[1] for e in events],
                       "merchant_id": 9, "event_timestamp": [_ts(e[2]) for e in events],
                       "amount": 10.0, "label": [0, 1, 0, 0, 1, 0, 0, 1]})
    tx["event_timestamp"] = tx["event_timestamp"].astype("datetime64[us, UTC]")
    for day, part in tx.groupby(tx["event_timestamp"].dt.date):
        _write(fraud.partition_path(data_root, "transactions", day), part)


def test_point_in_time_join_with_crafted_rows(dp_settings):
    _craft(dp_settings.resolved_data_root)
    featurestore.apply_feature_repo(dp_settings)
    info = snapshots.build_snapshot(dp_settings, val_days=1, test_days=1)
    df = _all_rows(info.uri).set_index("transaction_id")
    got = df["customer_avg_amount_30d"].to_dict()
    assert got[1] == 1 and got[2] == 1 and got[3] == 2  # nothing from after the event
    assert got[4] == 20 and got[5] == 20 and np.isnan(got[6])  # TTL respected
    assert got[7] == 31 and got[8] == 4
    assert df.loc[[1, 3, 8], "merchant_fraud_rate_30d"].tolist() == [0.01, 0.02, 0.04]
    assert info.manifest["missing_features"] == {"handling": "fail", "rows": 1}
    # "drop" handling removes the expired row and is a different dataset version.
    dropped = snapshots.build_snapshot(dp_settings, val_days=1, test_days=1, missing_features="drop")
    assert dropped.dataset_version != info.dataset_version
    assert 6 not in _all_rows(dropped.uri)["transaction_id"].tolist()
    # Chunks of 3 events (one ends right after the expired row) give the same snapshot.
    again = snapshots.build_snapshot(dp_settings, val_days=1, test_days=1, missing_features="drop", chunk_rows=3)
    assert again.dataset_version == dropped.dataset_version and not again.created
    assert dropped.manifest["rows"] == 7 and dropped.manifest["missing_features"]["rows"] == 1


# ----------------------------------------------------------------------------- bad inputs


def _tx_path(settings, day="2026-01-03") -> Path:
    return fraud.partition_path(settings.resolved_data_root, "transactions", day)


def _rewrite(path: Path, fn) -> None:
    pq.write_table(fn(pq.read_table(path)), path)


def _assert_nothing_written(settings) -> None:
    assert not (_local(settings.resolved_object_root) / "datasets").exists()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda t: t.slice(0, 0), "empty partition"),
        (lambda t: t.drop_columns(["amount"]), "missing column 'amount'"),
        (lambda t: t.set_column(1, "customer_id", t.column("customer_id").cast(pa.string())),
         "'customer_id' has type string, expected integer"),
        (lambda t: t.set_column(3, "event_timestamp", pa.array(
            [datetime(2030, 1, 3, tzinfo=UTC)] * t.num_rows, pa.timestamp("us", tz="UTC"))), "in the future"),
        (lambda t: t.set_column(3, "event_timestamp", pa.array(
            [datetime(2026, 1, 4, 1, tzinfo=UTC)] * t.num_rows, pa.timestamp("us", tz="UTC"))),
         "outside the partition's date"),
        (lambda t: t.set_column(5, "label", pa.array([2] * t.num_rows, pa.int64())), "column 'label' values"),
        (lambda t: t.set_column(3, "event_timestamp", t.column("event_timestamp").cast(pa.timestamp("us"))),
         "no time zone"),
    ],
    ids=["empty", "missing-column", "wrong-dtype", "future", "wrong-day", "bad-label", "naive-time"],
)
def test_bad_transactions_partition_is_refused_and_nothing_written(dp_generated, corrupt, message):
    path = _tx_path(dp_generated)
    _rewrite(path, corrupt)
    with pytest.raises(DataError, match=message) as err:
        snapshots.build_snapshot(dp_generated, val_days=1, test_days=1)
    assert "date=2026-01-03" in str(err.value)
    _assert_nothing_written(dp_generated)


def test_same_partition_delivered_twice_is_deduplicated(dp_generated, dp_snapshot):
    path = _tx_path(dp_generated)
    shutil.copy(path, path.with_name("part-1.parquet"))  # the same file landed twice
    info = snapshots.build_snapshot(dp_generated, val_days=1, test_days=1)
    assert info.manifest["duplicates_dropped"] == 300
    assert info.dataset_version == dp_snapshot[1].dataset_version  # same content, same version


def test_conflicting_duplicate_ids_are_refused(dp_generated):
    path = _tx_path(dp_generated)
    t = pq.read_table(path)
    pq.write_table(t.set_column(4, "amount", pa.compute.add(t.column("amount"), 1.0)),
                   path.with_name("part-1.parquet"))
    with pytest.raises(DataError, match="transaction_id not unique"):
        snapshots.build_snapshot(dp_generated, val_days=1, test_days=1)
    _assert_nothing_written(dp_generated)


def test_no_data_is_a_clear_error(dp_settings):
    featurestore.apply_feature_repo(dp_settings)
    with pytest.raises(DataError, match="no transactions partitions"):
        snapshots.build_snapshot(dp_settings)


def test_tampered_snapshot_is_detected(dp_generated):
    info = snapshots.build_snapshot(dp_generated, val_days=1, test_days=1)
    test_file = _local(info.uri) / "test.parquet"
    test_file.write_bytes(test_file.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DataError, match="sha256 does not match"):
        snapshots.load_snapshot(info.uri)
    (_local(info.uri) / "manifest.json").unlink()
    with pytest.raises(DataError, match="not a committed snapshot"):
        snapshots.read_manifest(info.uri)


# ----------------------------------------------------------------------------- online store


def test_online_read_matches_the_offline_value(dp_generated):
    end = datetime(2026, 1, 6, 12, tzinfo=UTC)
    intervals = featurestore.materialize_incremental(dp_generated, end)
    assert intervals["customer_stats"][-1][1] == end.isoformat()
    rows = [{"customer_id": 5, "merchant_id": 3}, {"customer_id": 17, "merchant_id": 8}]
    online = featurestore.get_online_features(dp_generated, rows)
    store = featurestore.feature_store(dp_generated)
    offline = store.get_historical_features(
        entity_df=pd.DataFrame(rows).assign(event_timestamp=end),
        features=store.get_feature_service("fraud_model_v1"),
    ).to_df().sort_values("customer_id")
    for col in FEATURES[1:]:
        assert online[col] == pytest.approx(offline[col].tolist()), col
    # Incremental: re-apply keeps the state, the next run starts where the last one ended.
    featurestore.apply_feature_repo(dp_generated)
    later = featurestore.materialize_incremental(dp_generated, datetime(2026, 1, 7, tzinfo=UTC))
    assert later["customer_stats"][-1] == [end.isoformat(), "2026-01-07T00:00:00+00:00"]
    assert len(later["customer_stats"]) == len(intervals["customer_stats"]) + 1
    assert json.dumps(later)  # plain data, fit for XCom


# ----------------------------------------------------------------------------- any pipeline: the delivery-ETA example

ETA_FEATURES = ["distance_km", "courier_avg_minutes_14d", "courier_deliveries_7d", "courier_tenure_days",
                "zone_congestion_index", "zone_avg_minutes_7d"]


def test_generic_modules_name_no_example_column():
    """The data plane reads every column name from the definition: none of the fraud example's is in it."""
    import inspect

    from ctrain import validation

    for module in (landing, featurestore, snapshots, storage, layout, validation):
        source = inspect.getsource(module).lower()
        named = [w for w in ("transaction_id", "customer_id", "merchant_id", "amount", "fraud") if w in source]
        assert not named, f"{module.__name__} names {named}"


def test_a_regression_pipeline_snapshot_follows_its_definition(dp_eta_snapshot):
    settings, info = dp_eta_snapshot
    m, events = info.manifest, settings.definition.events
    assert CONTRACT_KEYS <= m.keys() and m["pipeline"] == "delivery_eta" and m["task"] == "regression"
    assert (m["id_column"], m["timestamp_column"], m["label_column"]) == ("delivery_id", "ordered_at", "minutes")
    assert m["entity_columns"] == ["courier_id", "zone_id"] == events.entity_columns
    assert m["feature_columns"] == ETA_FEATURES and m["feature_service"] == "delivery_eta_v1"
    assert m["schema"]["minutes"] == "double" and m["schema"]["delivery_id"] == "int64"
    assert m["schema"]["ordered_at"] == "timestamp[us, tz=UTC]"
    assert m["label_rate"] is None and all(s["label_rate"] is None for s in m["splits"].values())
    assert [m["splits"][s]["rows"] for s in ("train", "val", "test")] == [6 * 400, 7 * 400, 7 * 400]
    assert m["missing_features"] == {"handling": "fail", "rows": 0}
    tables = {p["table"] for p in m["source_partitions"]["partitions"]}
    assert tables == {"deliveries", *settings.definition.feature_tables}
    df = _all_rows(info.uri)
    assert df["minutes"].dtype == np.float64 and df[ETA_FEATURES].notna().all().all()
    # Point in time: each delivery sees its zone's row of its own day (stamped 00:00 UTC).
    zones = pd.concat(pq.read_table(p).to_pandas() for p in
                      sorted(settings.resolved_data_root.glob("features/zone_stats/*/*.parquet")))
    expected = df.assign(day=df["ordered_at"].dt.floor("D"))[["zone_id", "day"]].merge(
        zones.rename(columns={"event_timestamp": "day"}), on=["zone_id", "day"], how="left")
    np.testing.assert_array_equal(df["zone_avg_minutes_7d"], expected["zone_avg_minutes_7d"])


def _eta_part(settings, day="2026-01-10") -> Path:
    return settings.resolved_data_root / "deliveries" / f"date={day}" / "part-0.parquet"


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda t: t.drop_columns(["minutes"]), "missing column 'minutes'"),
        (lambda t: t.set_column(2, "zone_id", t.column("zone_id").cast(pa.string())),
         "column 'zone_id' has type string, expected integer"),
        (lambda t: t.set_column(5, "minutes", t.column("minutes").cast(pa.int64(), safe=False)),
         "column 'minutes' has type int64, expected floating"),
        (lambda t: t.set_column(5, "minutes", pa.array([float("nan")] + [1.0] * (t.num_rows - 1))),
         "column 'minutes' \\(the target\\) has 1 NaN"),
        (lambda t: t.set_column(5, "minutes", pa.array([None] + [1.0] * (t.num_rows - 1), pa.float64())),
         "column 'minutes' has 1 null"),
    ],
    ids=["absent-target", "string-key", "integer-target", "nan-target", "null-target"],
)
def test_a_broken_delivery_partition_is_refused_naming_file_and_column(dp_eta_copy, corrupt, message):
    path = _eta_part(dp_eta_copy)
    _rewrite(path, corrupt)
    with pytest.raises(DataError, match=message) as err:
        snapshots.build_snapshot(dp_eta_copy)
    assert str(err.value).startswith(f"{path}:")
    _assert_nothing_written(dp_eta_copy)


def test_the_events_table_comes_from_the_definition(dp_eta_copy):
    with pytest.raises(DataError, match="no deliveries partitions between"):
        snapshots.check_window(dp_eta_copy, start="2027-01-01")
    assert landing.list_partitions(dp_eta_copy.resolved_data_root, "deliveries")[-1].isoformat() == "2026-01-20"
    assert landing.list_partitions(dp_eta_copy.resolved_data_root, "transactions") == []
