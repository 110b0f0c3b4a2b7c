"""Seeded generator of the example domain: card-transaction fraud.

It writes what an upstream system would land every day, in the layout the Feast repo reads::

    {out}/transactions/date=YYYY-MM-DD/part-0.parquet             labelled events
    {out}/features/customer_stats/date=YYYY-MM-DD/part-0.parquet  customer aggregates
    {out}/features/merchant_stats/date=YYYY-MM-DD/part-0.parquet  merchant aggregates
    {out}/_datagen.json                                           the arguments used (read by append_day)

Every customer and merchant gets one aggregate row per day, stamped at 00:00 UTC of that day (the
aggregate over everything before that instant), so a transaction on day D sees the day-D row. The label
follows a hidden rule over exactly those visible values plus the amount, so a model trained on
point-in-time-correct features can learn it (a small MLP reaches ROC AUC ~0.9) and a leaky join cannot
help it. Fraud rate is about 3 %.

Output is deterministic: the same arguments give byte-identical parquet files, and a day's partition
does not depend on how many days were generated with it (``append_day`` lands the same bytes that
``generate`` would have written for that date).

Run::

    python -m ctrain_examples.fraud --out .ctrain/data --days 60 --start 2026-01-01 --seed 0
    python -m ctrain_examples.fraud --out .ctrain/data --append 2026-03-02          # land one more day
    python -m ctrain_examples.fraud --out /tmp/bad --days 10 --corrupt-nulls 0.2 \\
        --corrupt-table customer_stats --corrupt-date 2026-01-05            # bad data for the GX gate

Knobs for later scenarios: ``drift`` (gradual covariate shift), ``label_flip`` (label poisoning),
``feature_shift`` (shifted feature sources), and :func:`inject_nulls` (a corrupted partition).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ctrain import landing, layout
from ctrain.errors import ConfigError, DataError
from ctrain.storage import write_bytes

if TYPE_CHECKING:
    import pyarrow as pa

TRANSACTIONS = "transactions"
CUSTOMER_STATS = "customer_stats"
MERCHANT_STATS = "merchant_stats"
FEATURE_TABLES: dict[str, list[str]] = {
    CUSTOMER_STATS: [
        "customer_avg_amount_30d",
        "customer_txn_count_7d",
        "customer_chargeback_rate_90d",
        "customer_account_age_days",
    ],
    MERCHANT_STATS: [
        "merchant_fraud_rate_30d",
        "merchant_avg_amount_30d",
        "merchant_txn_count_7d",
    ],
}
TABLE_KEYS = {TRANSACTIONS: "transaction_id", CUSTOMER_STATS: "customer_id", MERCHANT_STATS: "merchant_id"}
PARAMS_FILE = "_datagen.json"
PART_FILE = "part-0.parquet"

# Ids are unique across days without coordination: day number since 1970 * this + row number.
_ID_STRIDE = 10_000_000
_EPOCH = date(1970, 1, 1)
# Random streams: separate generators per concern so that changing one knob never reshuffles another.
_STREAM_ENTITIES, _STREAM_TXN, _STREAM_CUST, _STREAM_MERCH, _STREAM_FLIP, _STREAM_NULLS = range(6)


@dataclass(frozen=True)
class GenParams:
    """Generator arguments that define the world (stored in ``_datagen.json`` for ``append_day``)."""

    seed: int = 0
    rows_per_day: int = 3000
    n_customers: int = 2000
    n_merchants: int = 200
    drift: float = 0.0
    label_flip: float = 0.0
    feature_shift: float = 0.0
    start: str = ""
    days: int = 0

    def check(self) -> None:
        """Raise ConfigError naming the first invalid argument."""
        if self.rows_per_day < 1 or self.rows_per_day >= _ID_STRIDE:
            raise ConfigError(f"rows_per_day={self.rows_per_day}: must be in [1, {_ID_STRIDE - 1}]")
        if self.n_customers < 1 or self.n_merchants < 1:
            raise ConfigError("n_customers and n_merchants must be >= 1")
        if not 0.0 <= self.label_flip <= 1.0:
            raise ConfigError(f"label_flip={self.label_flip}: must be a fraction in [0, 1]")


# --------------------------------------------------------------------------------------------------
# The world: per-entity latent traits (fixed by the seed) and per-day observations.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _World:
    cust_log_amount: np.ndarray
    cust_risk: np.ndarray
    cust_activity: np.ndarray
    cust_open_day: np.ndarray  # day number since 1970 the account was opened
    merch_log_amount: np.ndarray
    merch_risk: np.ndarray
    merch_popularity: np.ndarray


def _world(p: GenParams) -> _World:
    rng = np.random.default_rng([p.seed, _STREAM_ENTITIES])
    nc, nm = p.n_customers, p.n_merchants
    activity = rng.gamma(2.0, 1.0, nc)
    popularity = rng.lognormal(0.0, 1.0, nm)  # a few big merchants, none dominating
    return _World(
        cust_log_amount=rng.normal(3.6, 0.6, nc),
        cust_risk=rng.normal(0.0, 1.0, nc),
        cust_activity=activity / activity.sum(),
        # accounts opened up to ~8 years before 2026; some are brand new (high risk)
        cust_open_day=(_day_number(date(2026, 1, 1)) - rng.exponential(700.0, nc)).astype(np.int64),
        merch_log_amount=rng.normal(3.6, 0.5, nm),
        merch_risk=rng.normal(0.0, 1.0, nm),
        merch_popularity=popularity / popularity.sum(),
    )


def _day_number(d: date) -> int:
    return (d - _EPOCH).days


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _drift_at(p: GenParams, d: date) -> float:
    """Drift offset for a day: ``drift`` per 30 days after 2026-01-01 (independent of the window)."""
    return p.drift * max(_day_number(d) - _day_number(date(2026, 1, 1)), 0) / 30.0


def _customer_stats(p: GenParams, w: _World, d: date) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([p.seed, _STREAM_CUST, _day_number(d)])
    n = p.n_customers
    shift = _drift_at(p, d)
    age = np.maximum(_day_number(d) - w.cust_open_day, 0).astype(np.float64)
    cols = {
        "customer_avg_amount_30d": np.exp(w.cust_log_amount + shift + rng.normal(0, 0.08, n)),
        "customer_txn_count_7d": rng.poisson(w.cust_activity * n * 7 * 1.5).astype(np.float64),
        "customer_chargeback_rate_90d": np.clip(
            _sigmoid(1.3 * w.cust_risk - 3.6) + rng.normal(0, 0.004, n), 0.0, 1.0
        ),
        "customer_account_age_days": age,
    }
    return _shift_features(p, cols)


def _merchant_stats(p: GenParams, w: _World, d: date) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([p.seed, _STREAM_MERCH, _day_number(d)])
    n = p.n_merchants
    shift = _drift_at(p, d)
    cols = {
        "merchant_fraud_rate_30d": np.clip(
            _sigmoid(1.2 * (w.merch_risk + 0.5 * shift) - 3.8) + rng.normal(0, 0.003, n), 0.0, 1.0
        ),
        "merchant_avg_amount_30d": np.exp(w.merch_log_amount + shift + rng.normal(0, 0.05, n)),
        "merchant_txn_count_7d": rng.poisson(w.merch_popularity * p.rows_per_day * 7).astype(np.float64),
    }
    return _shift_features(p, cols)


def _shift_features(p: GenParams, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feature_shift``: move every published feature by that many of its own standard deviations.

    The label rule keeps using the true values, so a shifted source both changes the distribution (drift
    checks see it) and breaks the feature/label relationship (holdout metrics see it).
    """
    if not p.feature_shift:
        return cols
    shifted = {}
    for name, v in cols.items():
        out = v + p.feature_shift * float(np.std(v))
        if name.endswith("_rate_90d") or name.endswith("_rate_30d"):
            out = np.clip(out, 0.0, 1.0)
        shifted[name] = np.maximum(out, 0.0)
    return shifted


def _fraud_logit(
    amount: np.ndarray, cust: dict[str, np.ndarray], merch: dict[str, np.ndarray]
) -> np.ndarray:
    """The hidden rule, over exactly the feature values visible at the transaction's time."""
    ratio = np.log(amount) - np.log(cust["customer_avg_amount_30d"])
    cb = np.log(cust["customer_chargeback_rate_90d"] + 1e-3)
    mf = np.log(merch["merchant_fraud_rate_30d"] + 1e-3)
    young = cust["customer_account_age_days"] < 45
    velocity = np.log1p(cust["customer_txn_count_7d"])
    return (
        -6.1
        + 1.4 * (cb + 3.6)
        + 1.3 * (mf + 3.8)
        + 2.0 * np.maximum(ratio - 0.7, 0.0)
        + 1.6 * young
        + 0.8 * np.maximum(velocity - 3.0, 0.0) * (ratio > 0.3)
    )


def _transactions(p: GenParams, w: _World, d: date) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([p.seed, _STREAM_TXN, _day_number(d)])
    n = p.rows_per_day
    cust_id = rng.choice(p.n_customers, size=n, p=w.cust_activity)
    merch_id = rng.choice(p.n_merchants, size=n, p=w.merch_popularity)
    seconds = np.sort(rng.integers(0, 86_400_000_000, n))  # microseconds into the day
    # Amount: the customer's usual spend around the merchant's typical ticket, with occasional spikes.
    log_amount = (
        0.6 * w.cust_log_amount[cust_id]
        + 0.4 * w.merch_log_amount[merch_id]
        + _drift_at(p, d)
        + rng.normal(0, 0.5, n)
        + (rng.random(n) < 0.06) * rng.normal(1.6, 0.5, n)
    )
    amount = np.round(np.exp(log_amount), 2) + 0.01
    # The rule uses the true (unshifted) aggregates, whatever the published tables say.
    truth = GenParams(**{**asdict(p), "feature_shift": 0.0})
    cust = {k: v[cust_id] for k, v in _customer_stats(truth, w, d).items()}
    merch = {k: v[merch_id] for k, v in _merchant_stats(truth, w, d).items()}
    label = (rng.random(n) < _sigmoid(_fraud_logit(amount, cust, merch))).astype(np.int64)
    if p.label_flip:
        flip_rng = np.random.default_rng([p.seed, _STREAM_FLIP, _day_number(d)])
        flip = flip_rng.random(n) < p.label_flip
        label = np.where(flip, 1 - label, label)
    day0 = np.datetime64(d.isoformat(), "us")
    return {
        "transaction_id": _day_number(d) * _ID_STRIDE + np.arange(n, dtype=np.int64),
        "customer_id": cust_id.astype(np.int64),
        "merchant_id": merch_id.astype(np.int64),
        "event_timestamp": day0 + seconds.astype("timedelta64[us]"),
        "amount": amount.astype(np.float64),
        "label": label,
    }


def _entity_rows(key: str, n: int, d: date, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ts = np.full(n, np.datetime64(d.isoformat(), "us"))
    # created_timestamp: when the aggregate job wrote the row (a few minutes after the cut-off).
    return {key: np.arange(n, dtype=np.int64), "event_timestamp": ts,
            "created_timestamp": ts + np.timedelta64(5, "m"), **cols}


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _to_table(cols: dict[str, np.ndarray]) -> pa.Table:
    import pyarrow as pa

    arrays = {}
    for name, v in cols.items():
        if np.issubdtype(v.dtype, np.datetime64):
            arrays[name] = pa.array(v, type=pa.timestamp("us", tz="UTC"))
        else:
            arrays[name] = pa.array(v)
    return pa.table(arrays)


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_statistics=True)
    return sink.getvalue().to_pybytes()


def partition_path(out: str | Path, table: str, d: date | str) -> Path:
    """Path of one daily partition of ``table`` (transactions, customer_stats or merchant_stats)."""
    d = _as_date(d)
    if table not in TABLE_KEYS:
        raise ConfigError(f"unknown table {table!r}: expected one of {sorted(TABLE_KEYS)}")
    return layout.partition_dir(out, _landed_table(table), d) / PART_FILE


def _landed_table(table: str) -> str:
    """The landed table name (as the definition and the Feast repo read it) of a generated table."""
    return TRANSACTIONS if table == TRANSACTIONS else f"features/{table}"


def _day_tables(p: GenParams, w: _World, d: date) -> dict[str, pa.Table]:
    return {
        TRANSACTIONS: _to_table(_transactions(p, w, d)),
        CUSTOMER_STATS: _to_table(_entity_rows("customer_id", p.n_customers, d, _customer_stats(p, w, d))),
        MERCHANT_STATS: _to_table(_entity_rows("merchant_id", p.n_merchants, d, _merchant_stats(p, w, d))),
    }


def _write_day(out: Path, p: GenParams, w: _World, d: date, overwrite: bool) -> list[Path]:
    """Write one day's three partitions. Same bytes already there = no-op; different bytes = DataError."""
    encoded = {t: _parquet_bytes(tab) for t, tab in _day_tables(p, w, d).items()}
    todo: list[tuple[Path, bytes]] = []
    for table, data in encoded.items():
        path = partition_path(out, table, d)
        if path.exists() and path.read_bytes() == data:
            continue
        if path.exists() and not overwrite:
            # Checked for all three tables before writing any, so a refused day leaves nothing changed.
            raise DataError(
                f"partition {path} already exists with different content; a delivered partition is "
                "immutable. Pass overwrite=True (CLI: --overwrite) to replace it deliberately."
            )
        todo.append((path, data))
    for path, data in todo:
        write_bytes(LocalFileSystem(), str(path), data)  # temp file + rename: never half a partition
    written = [path for path, _ in todo]
    return written


def _as_date(d: date | str) -> date:
    if isinstance(d, datetime):
        return d.date()
    if isinstance(d, date):
        return d
    try:
        return date.fromisoformat(d)
    except ValueError as e:
        raise ConfigError(f"date {d!r} is not YYYY-MM-DD") from e


def _save_params(out: Path, p: GenParams) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / PARAMS_FILE).write_text(json.dumps(asdict(p), indent=2, sort_keys=True) + "\n")


def load_params(out: str | Path) -> GenParams:
    """The arguments ``generate`` used for ``out`` (DataError if ``out`` was not generated here)."""
    path = Path(out) / PARAMS_FILE
    if not path.exists():
        raise DataError(f"{path} not found: run generate() (python -m ctrain_examples.fraud) for {out} first")
    return GenParams(**json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def generate(
    out: str | Path,
    days: int = 60,
    start: date | str = "2026-01-01",
    seed: int = 0,
    *,
    rows_per_day: int = 3000,
    n_customers: int = 2000,
    n_merchants: int = 200,
    drift: float = 0.0,
    label_flip: float = 0.0,
    feature_shift: float = 0.0,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``days`` daily partitions starting at ``start``; return the paths written.

    Idempotent: partitions that already hold exactly these bytes are left alone.
    """
    if days < 1:
        raise ConfigError(f"days={days}: must be >= 1")
    start_d = _as_date(start)
    p = GenParams(
        seed=seed, rows_per_day=rows_per_day, n_customers=n_customers, n_merchants=n_merchants,
        drift=drift, label_flip=label_flip, feature_shift=feature_shift,
        start=start_d.isoformat(), days=days,
    )
    p.check()
    out = Path(out)
    w = _world(p)
    written: list[Path] = []
    for i in range(days):
        written += _write_day(out, p, w, start_d + timedelta(days=i), overwrite)
    _save_params(out, p)
    return written


def append_day(
    out: str | Path,
    day: date | str,
    *,
    seed: int | None = None,
    label_flip: float | None = None,
    feature_shift: float | None = None,
    drift: float | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Land one new day's partitions in ``out`` with the world ``generate`` created there.

    The knobs default to the stored ones; pass ``label_flip``/``feature_shift`` to land a poisoned or
    shifted day. Delivering the same day twice is a no-op when the bytes match and a DataError when
    they differ (unless ``overwrite``).
    """
    stored = load_params(out)
    changes = {
        k: v
        for k, v in {"seed": seed, "label_flip": label_flip, "feature_shift": feature_shift, "drift": drift}.items()
        if v is not None
    }
    p = GenParams(**{**asdict(stored), **changes})
    p.check()
    return _write_day(Path(out), p, _world(p), _as_date(day), overwrite)


def inject_nulls(
    out: str | Path,
    table: str,
    day: date | str,
    fraction: float,
    columns: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Set ``fraction`` of the values of ``columns`` (default: every feature column) to null in one partition.

    Simulates a broken upstream job. Rewrites the partition atomically and returns its path.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction={fraction}: must be in (0, 1]")
    path = partition_path(out, table, day)
    if not path.exists():
        raise DataError(f"cannot inject nulls: partition {path} does not exist")
    tab = pq.read_table(path)
    default_cols = ["amount"] if table == TRANSACTIONS else FEATURE_TABLES[table]
    columns = columns or default_cols
    missing = [c for c in columns if c not in tab.column_names]
    if missing:
        raise ConfigError(f"columns {missing} not in {path} (has {tab.column_names})")
    rng = np.random.default_rng([seed, _STREAM_NULLS, _day_number(_as_date(day))])
    for name in columns:
        mask = pa.array(rng.random(tab.num_rows) < fraction)
        i = tab.column_names.index(name)
        col = tab.column(name)
        tab = tab.set_column(i, name, pc.if_else(mask, pa.scalar(None, col.type), col))
    write_bytes(LocalFileSystem(), str(path), _parquet_bytes(tab))
    return path


def list_partitions(out: str | Path, table: str = TRANSACTIONS) -> list[date]:
    """Dates that have a partition of ``table`` under ``out``, sorted (``ctrain.landing``'s listing)."""
    if table not in TABLE_KEYS:
        raise ConfigError(f"unknown table {table!r}: expected one of {sorted(TABLE_KEYS)}")
    return landing.list_partitions(Path(out), _landed_table(table))


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m ctrain_examples.fraud``: see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m ctrain_examples.fraud", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (the data root)")
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--start", default="2026-01-01", help="first day, YYYY-MM-DD")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows-per-day", type=int, default=3000)
    ap.add_argument("--customers", type=int, default=2000)
    ap.add_argument("--merchants", type=int, default=200)
    ap.add_argument("--drift", type=float, default=0.0, help="covariate drift per 30 days (log-amount units)")
    ap.add_argument("--label-flip", type=float, default=0.0, help="fraction of labels flipped (poisoning)")
    ap.add_argument("--feature-shift", type=float, default=0.0, help="shift feature sources by X std devs")
    ap.add_argument("--append", metavar="YYYY-MM-DD", help="land one more day in an existing --out")
    ap.add_argument("--overwrite", action="store_true", help="replace partitions whose content differs")
    ap.add_argument("--corrupt-nulls", type=float, metavar="FRACTION")
    ap.add_argument("--corrupt-table", default=CUSTOMER_STATS, choices=sorted(TABLE_KEYS))
    ap.add_argument("--corrupt-date", metavar="YYYY-MM-DD")
    args = ap.parse_args(argv)

    if args.append:
        written = append_day(
            args.out, args.append, label_flip=args.label_flip or None,
            feature_shift=args.feature_shift or None, overwrite=args.overwrite,
        )
    else:
        written = generate(
            args.out, args.days, args.start, args.seed, rows_per_day=args.rows_per_day,
            n_customers=args.customers, n_merchants=args.merchants, drift=args.drift,
            label_flip=args.label_flip, feature_shift=args.feature_shift, overwrite=args.overwrite,
        )
    print(f"wrote {len(written)} partition file(s) under {args.out}")
    if args.corrupt_nulls:
        if not args.corrupt_date:
            ap.error("--corrupt-nulls needs --corrupt-date")
        path = inject_nulls(args.out, args.corrupt_table, args.corrupt_date, args.corrupt_nulls)
        print(f"injected nulls ({args.corrupt_nulls:.0%}) into {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
