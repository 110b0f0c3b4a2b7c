"""ctrain_examples.fraud (the fraud example's generator): deterministic, learnable, and the corruption knobs do what they say."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ctrain.errors import ConfigError, DataError
from ctrain_examples import fraud

SMALL = {"rows_per_day": 200, "n_customers": 150, "n_merchants": 30}


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def _joined(root) -> pd.DataFrame:
    """Transactions with the day's aggregate rows (the day-D row is stamped D 00:00, so a same-day join)."""
    tx = pd.concat(pq.read_table(p).to_pandas() for p in sorted(root.glob("transactions/*/*.parquet")))
    tx["day"] = tx["event_timestamp"].dt.floor("D")
    for table, key in [(fraud.CUSTOMER_STATS, "customer_id"), (fraud.MERCHANT_STATS, "merchant_id")]:
        f = pd.concat(pq.read_table(p).to_pandas() for p in sorted(root.glob(f"features/{table}/*/*.parquet")))
        tx = tx.merge(f.drop(columns="created_timestamp").rename(columns={"event_timestamp": "day"}),
                      on=[key, "day"], how="left", validate="many_to_one")
    return tx


def test_same_arguments_give_byte_identical_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    fraud.generate(a, days=3, seed=7, **SMALL)
    fraud.generate(b, days=3, seed=7, **SMALL)
    fraud.generate(c, days=3, seed=8, **SMALL)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 9  # 3 days x (transactions, customer_stats, merchant_stats)
    assert fa == fb
    assert fa.keys() == fc.keys() and all(fa[k] != fc[k] for k in fa)


def test_append_day_lands_the_same_bytes_generate_would(tmp_path):
    full, grown = tmp_path / "full", tmp_path / "grown"
    fraud.generate(full, days=3, start="2026-02-01", **SMALL)
    fraud.generate(grown, days=2, start="2026-02-01", **SMALL)
    written = fraud.append_day(grown, "2026-02-03")
    assert len(written) == 3
    assert _files(full) == _files(grown)
    assert fraud.list_partitions(grown) == [date(2026, 2, 1), date(2026, 2, 2), date(2026, 2, 3)]


def test_same_partition_twice_is_a_noop_and_a_conflicting_one_an_error(tmp_path):
    fraud.generate(tmp_path, days=2, **SMALL)
    before = _files(tmp_path)
    assert fraud.append_day(tmp_path, "2026-01-02") == []  # identical re-delivery: nothing rewritten
    with pytest.raises(DataError, match="already exists with different content"):
        fraud.append_day(tmp_path, "2026-01-02", label_flip=0.5)
    assert _files(tmp_path) == before
    assert len(fraud.append_day(tmp_path, "2026-01-02", label_flip=0.5, overwrite=True)) == 1  # labels only


def test_schema_ids_and_timestamps(tmp_path):
    fraud.generate(tmp_path, days=3, **SMALL)
    tx = pq.read_table(fraud.partition_path(tmp_path, "transactions", "2026-01-02"))
    assert tx.schema.names == ["transaction_id", "customer_id", "merchant_id", "event_timestamp", "amount", "label"]
    assert str(tx.schema.field("event_timestamp").type) == "timestamp[us, tz=UTC]"
    assert str(tx.schema.field("label").type) == "int64"
    df = pd.concat(pq.read_table(p).to_pandas() for p in sorted(tmp_path.glob("transactions/*/*.parquet")))
    assert df["transaction_id"].is_unique and len(df) == 600
    assert (df["event_timestamp"].dt.date.astype(str) == df["transaction_id"].map(
        lambda i: str(date.fromordinal(date(1970, 1, 1).toordinal() + i // 10_000_000)))).all()
    assert df["amount"].gt(0).all() and set(df["label"]) <= {0, 1}
    cs = pq.read_table(fraud.partition_path(tmp_path, "customer_stats", "2026-01-02")).to_pandas()
    assert len(cs) == SMALL["n_customers"] and cs["customer_id"].is_unique
    assert (cs["event_timestamp"] == pd.Timestamp("2026-01-02", tz="UTC")).all()
    assert list(cs.columns[3:]) == fraud.FEATURE_TABLES["customer_stats"]


def test_hidden_rule_is_learnable_and_fraud_is_rare(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    fraud.generate(tmp_path, days=8, rows_per_day=1500)
    df = _joined(tmp_path)
    features = ["amount", *fraud.FEATURE_TABLES["customer_stats"], *fraud.FEATURE_TABLES["merchant_stats"]]
    x = np.log1p(df[features].to_numpy())
    train = (df["day"] < pd.Timestamp("2026-01-07", tz="UTC")).to_numpy()
    scaler = StandardScaler().fit(x[train])
    model = LogisticRegression(max_iter=1000).fit(scaler.transform(x[train]), df["label"][train])
    auc = roc_auc_score(df["label"][~train], model.predict_proba(scaler.transform(x[~train]))[:, 1])
    assert 0.01 < df["label"].mean() < 0.06
    assert auc > 0.8, auc


def test_inject_nulls_hits_only_the_named_partition_and_columns(tmp_path):
    fraud.generate(tmp_path, days=2, **SMALL)
    other = fraud.partition_path(tmp_path, "customer_stats", "2026-01-01").read_bytes()
    path = fraud.inject_nulls(tmp_path, "customer_stats", "2026-01-02", 0.5,
                                columns=["customer_avg_amount_30d"])
    df = pq.read_table(path).to_pandas()
    assert 0.3 < df["customer_avg_amount_30d"].isna().mean() < 0.7
    assert df.drop(columns="customer_avg_amount_30d").notna().all().all()
    assert fraud.partition_path(tmp_path, "customer_stats", "2026-01-01").read_bytes() == other
    with pytest.raises(DataError, match="does not exist"):
        fraud.inject_nulls(tmp_path, "customer_stats", "2027-01-01", 0.5)
    with pytest.raises(ConfigError, match="fraction"):
        fraud.inject_nulls(tmp_path, "customer_stats", "2026-01-02", 0.0)


def test_poisoning_knobs_change_labels_or_features_only(tmp_path):
    clean, flipped, shifted = tmp_path / "clean", tmp_path / "flip", tmp_path / "shift"
    for out, kw in [(clean, {}), (flipped, {"label_flip": 0.2}), (shifted, {"feature_shift": 1.0})]:
        fraud.generate(out, days=1, **SMALL, **kw)
    read = lambda root, t: pq.read_table(fraud.partition_path(root, t, "2026-01-01")).to_pandas()  # noqa: E731
    c, f = read(clean, "transactions"), read(flipped, "transactions")
    assert 0.1 < (c["label"] != f["label"]).mean() < 0.3
    assert c.drop(columns="label").equals(f.drop(columns="label"))
    assert read(shifted, "transactions").equals(c)  # the rule uses true values: labels unchanged
    cs, ss = read(clean, "customer_stats"), read(shifted, "customer_stats")
    assert ss["customer_avg_amount_30d"].mean() > cs["customer_avg_amount_30d"].mean() * 1.2


def test_cli_generates_and_corrupts(tmp_path):
    rc = fraud.main(["--out", str(tmp_path), "--days", "2", "--rows-per-day", "50", "--customers", "40",
                       "--merchants", "10", "--corrupt-nulls", "1.0", "--corrupt-table", "merchant_stats",
                       "--corrupt-date", "2026-01-02"])
    assert rc == 0
    bad = pq.read_table(fraud.partition_path(tmp_path, "merchant_stats", "2026-01-02")).to_pandas()
    assert bad[fraud.FEATURE_TABLES["merchant_stats"]].isna().all().all()
    assert fraud.load_params(tmp_path).rows_per_day == 50
