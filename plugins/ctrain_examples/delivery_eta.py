"""Seeded generator of the delivery-ETA example: how many minutes a food delivery takes (regression).

It writes what upstream systems would land every day, in the layout ``feature_repo/delivery_eta.py`` reads::

    {out}/deliveries/date=YYYY-MM-DD/part-0.parquet              delivered orders; target ``minutes``
    {out}/features/courier_stats/date=YYYY-MM-DD/part-0.parquet  one aggregate row per courier
    {out}/features/zone_stats/date=YYYY-MM-DD/part-0.parquet     one aggregate row per zone
    {out}/_delivery_eta.json                                     the arguments used (read by append_day)

The world: couriers with a hidden pace (minutes per km) that is slower in their first weeks, and zones
whose restaurants take their own time to prepare and whose congestion wanders slowly from day to day. A
delivery takes preparation plus distance times pace, both slowed by the zone's congestion that day, times
lognormal noise (so always positive). Every aggregate row is stamped 00:00 UTC of its day and computed
from the deliveries of the days before (the 7 or 14 days before the first generated day are simulated, not
landed), so a delivery on day D sees the day-D rows and only its own distance is new. Averages are shrunk
towards the window's overall mean by 3 pseudo-deliveries, so a courier without recent deliveries still has
one. Ids are int64, timestamps ``timestamp[us, tz=UTC]``, features float64.

Deterministic: the same arguments give byte-identical files, and a day's partitions do not depend on how
many days were generated with it (``append_day`` lands the bytes ``generate`` would have written).

Run::

    python -m ctrain_examples.delivery_eta --out .ctrain/data --days 60 --start 2026-01-01 --seed 0
    python -m ctrain_examples.delivery_eta --out .ctrain/data --append 2026-03-02   # land one more day
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ctrain import layout
from ctrain.errors import ConfigError, DataError
from ctrain.storage import write_bytes

DELIVERIES = "deliveries"
COURIER_STATS = "features/courier_stats"
ZONE_STATS = "features/zone_stats"
_TS = pa.timestamp("us", tz="UTC")
SCHEMAS: dict[str, pa.Schema] = {
    DELIVERIES: pa.schema([("delivery_id", pa.int64()), ("courier_id", pa.int64()), ("zone_id", pa.int64()),
                           ("ordered_at", _TS), ("distance_km", pa.float64()), ("minutes", pa.float64())]),
    COURIER_STATS: pa.schema([("courier_id", pa.int64()), ("event_timestamp", _TS), ("created_timestamp", _TS),
                              ("courier_avg_minutes_14d", pa.float64()), ("courier_deliveries_7d", pa.float64()),
                              ("courier_tenure_days", pa.float64())]),
    ZONE_STATS: pa.schema([("zone_id", pa.int64()), ("event_timestamp", _TS), ("created_timestamp", _TS),
                           ("zone_congestion_index", pa.float64()), ("zone_avg_minutes_7d", pa.float64())]),
}
PARAMS_FILE = "_delivery_eta.json"
PART_FILE = "part-0.parquet"

_ID_STRIDE = 10_000_000  # delivery_id = day number since 1970 * stride + row: unique across days
_EPOCH = date(1970, 1, 1)
_SHRINK = 3.0  # pseudo-deliveries at the window's mean in every average
# One random stream per concern, so that a change to one never reshuffles another.
_STREAM_WORLD, _STREAM_DELIVERIES, _STREAM_CONGESTION = range(3)


@dataclass(frozen=True)
class Params:
    """The arguments that define the world (stored in ``_delivery_eta.json`` for ``append_day``)."""

    seed: int = 0
    rows_per_day: int = 1500
    n_couriers: int = 300
    n_zones: int = 25

    def check(self) -> None:
        if not 1 <= self.rows_per_day < _ID_STRIDE:
            raise ConfigError(f"rows_per_day={self.rows_per_day}: must be in [1, {_ID_STRIDE - 1}]")
        if self.n_couriers < 1 or self.n_zones < 1:
            raise ConfigError(f"n_couriers={self.n_couriers}, n_zones={self.n_zones}: both must be >= 1")


class _World:
    """Hidden traits fixed by the seed, and every day's deliveries (cached: aggregates reread them)."""

    def __init__(self, p: Params) -> None:
        rng = np.random.default_rng([p.seed, _STREAM_WORLD])
        self.p = p
        self.pace = rng.lognormal(np.log(2.6), 0.2, p.n_couriers)  # min/km, experienced, free roads
        self.joined = (_day_number(date(2026, 1, 1)) - rng.exponential(200.0, p.n_couriers)).astype(np.int64)
        self.activity = _share(rng.gamma(3.0, 1.0, p.n_couriers))
        self.zone_share = _share(rng.gamma(2.0, 1.0, p.n_zones))
        self.prep = np.clip(rng.normal(9.0, 2.0, p.n_zones), 4.0, None)  # minutes in the kitchen
        self.base = rng.uniform(0.15, 0.75, p.n_zones)
        self.amplitude = rng.uniform(0.0, 0.15, p.n_zones)
        self.period = rng.uniform(20.0, 45.0, p.n_zones)
        self.phase = rng.uniform(0.0, 2 * np.pi, p.n_zones)
        self._days: dict[int, dict[str, np.ndarray]] = {}

    def congestion(self, day: int) -> np.ndarray:
        """Measured congestion of every zone on ``day`` (number since 1970), in [0, 1]."""
        rng = np.random.default_rng([self.p.seed, _STREAM_CONGESTION, day])
        wave = self.amplitude * np.sin(2 * np.pi * day / self.period + self.phase)
        return np.clip(self.base + wave + rng.normal(0.0, 0.04, self.p.n_zones), 0.0, 1.0)

    def tenure(self, day: int) -> np.ndarray:
        return np.maximum(day - self.joined, 0).astype(np.float64)

    def deliveries(self, day: int) -> dict[str, np.ndarray]:
        if day not in self._days:
            self._days[day] = self._simulate(day)
        return self._days[day]

    def _simulate(self, day: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.p.seed, _STREAM_DELIVERIES, day])
        n = self.p.rows_per_day
        courier = rng.choice(self.p.n_couriers, n, p=self.activity)
        zone = rng.choice(self.p.n_zones, n, p=self.zone_share)
        micros = np.sort(rng.integers(0, 86_400_000_000, n))
        distance = np.round(np.minimum(0.3 + rng.gamma(2.2, 1.4, n), 25.0), 2)
        jam = self.congestion(day)[zone]
        pace = self.pace[courier] * (1.0 + 0.35 * np.exp(-self.tenure(day)[courier] / 45.0))
        minutes = (self.prep[zone] * (1.0 + 0.6 * jam) + distance * pace * (1.0 + 0.9 * jam)) * rng.lognormal(
            0.0, 0.1, n
        )
        return {
            "delivery_id": day * _ID_STRIDE + np.arange(n, dtype=np.int64),
            "courier_id": courier.astype(np.int64),
            "zone_id": zone.astype(np.int64),
            "ordered_at": _midnight(day) + micros.astype("timedelta64[us]"),
            "distance_km": distance,
            "minutes": np.round(minutes, 2),
        }

    def stats(self, day: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Courier and zone aggregate columns valid from 00:00 of ``day``: over the days before it."""

        def window(days: int, key: str, size: int) -> tuple[np.ndarray, np.ndarray]:
            past = [self.deliveries(day - k) for k in range(1, days + 1)]
            ids = np.concatenate([d[key] for d in past])
            minutes = np.concatenate([d["minutes"] for d in past])
            count = np.bincount(ids, minlength=size).astype(np.float64)
            total = np.bincount(ids, weights=minutes, minlength=size)
            return count, (total + _SHRINK * minutes.mean()) / (count + _SHRINK)

        count_7d, _ = window(7, "courier_id", self.p.n_couriers)
        _, courier_avg_14d = window(14, "courier_id", self.p.n_couriers)
        _, zone_avg_7d = window(7, "zone_id", self.p.n_zones)
        courier = {"courier_avg_minutes_14d": courier_avg_14d, "courier_deliveries_7d": count_7d,
                   "courier_tenure_days": self.tenure(day)}
        zone = {"zone_congestion_index": self.congestion(day - 1), "zone_avg_minutes_7d": zone_avg_7d}
        return courier, zone


def _share(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def _day_number(d: date) -> int:
    return (d - _EPOCH).days


def _midnight(day: int) -> np.datetime64:
    return np.datetime64(_EPOCH + timedelta(days=day), "us")


def _as_date(d: date | str) -> date:
    if isinstance(d, date):
        return d
    try:
        return date.fromisoformat(d)
    except ValueError:
        raise ConfigError(f"date {d!r} is not YYYY-MM-DD") from None


def _entity_rows(key: str, day: int, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(next(iter(cols.values())))
    stamp = np.full(n, _midnight(day))
    # created_timestamp: when the aggregation job wrote the row, a few minutes after the cut-off.
    return {key: np.arange(n, dtype=np.int64), "event_timestamp": stamp,
            "created_timestamp": stamp + np.timedelta64(5, "m"), **cols}


def partition_path(out: str | Path, table: str, day: date) -> Path:
    """Path of one daily partition of ``table`` (one of ``SCHEMAS``) under the data root ``out``."""
    if table not in SCHEMAS:
        raise ConfigError(f"unknown table {table!r}: expected one of {sorted(SCHEMAS)}")
    return layout.partition_dir(out, table, day) / PART_FILE


def _parquet_bytes(table: str, cols: dict[str, np.ndarray]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(cols, schema=SCHEMAS[table]), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _write_day(out: Path, w: _World, d: date, overwrite: bool) -> list[Path]:
    """Land one day's three partitions. Same bytes there = no-op; other bytes = DataError (or overwrite)."""
    day = _day_number(d)
    courier, zone = w.stats(day)
    tables = {DELIVERIES: w.deliveries(day), COURIER_STATS: _entity_rows("courier_id", day, courier),
              ZONE_STATS: _entity_rows("zone_id", day, zone)}
    encoded = {partition_path(out, t, d): _parquet_bytes(t, cols) for t, cols in tables.items()}
    todo = {path: data for path, data in encoded.items() if not (path.exists() and path.read_bytes() == data)}
    clash = [str(path) for path in todo if path.exists()]
    if clash and not overwrite:  # checked before writing anything: a refused day changes nothing
        raise DataError(f"partition(s) {', '.join(clash)} already exist with other content; a landed "
                        "partition is immutable (pass overwrite=True, CLI --overwrite, to replace it)")
    for path, data in todo.items():
        write_bytes(LocalFileSystem(), str(path), data)  # temp file + rename: never half a partition
    return list(todo)


def generate(
    out: str | Path,
    days: int = 60,
    start: date | str = "2026-01-01",
    seed: int = 0,
    *,
    rows_per_day: int = 1500,
    n_couriers: int = 300,
    n_zones: int = 25,
    overwrite: bool = False,
) -> list[Path]:
    """Land ``days`` daily partitions of the three tables from ``start``; return the paths written."""
    if days < 1:
        raise ConfigError(f"days={days}: must be >= 1")
    p = Params(seed=seed, rows_per_day=rows_per_day, n_couriers=n_couriers, n_zones=n_zones)
    p.check()
    first = _as_date(start)
    out, world = Path(out), _World(p)
    written = [path for i in range(days) for path in _write_day(out, world, first + timedelta(days=i), overwrite)]
    out.mkdir(parents=True, exist_ok=True)
    (out / PARAMS_FILE).write_text(json.dumps(asdict(p), indent=2, sort_keys=True) + "\n")
    return written


def append_day(out: str | Path, day: date | str, *, overwrite: bool = False) -> list[Path]:
    """Land one more day in ``out`` with the world ``generate`` stored there."""
    stored = Path(out) / PARAMS_FILE
    if not stored.is_file():
        raise DataError(f"{stored} not found: run generate() (python -m ctrain_examples.delivery_eta) first")
    world = _World(Params(**json.loads(stored.read_text())))
    return _write_day(Path(out), world, _as_date(day), overwrite)


def main(argv: list[str] | None = None) -> int:
    """``python -m ctrain_examples.delivery_eta``: see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m ctrain_examples.delivery_eta",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (the data root)")
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--start", default="2026-01-01", help="first day, YYYY-MM-DD")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows-per-day", type=int, default=1500)
    ap.add_argument("--couriers", type=int, default=300)
    ap.add_argument("--zones", type=int, default=25)
    ap.add_argument("--append", metavar="YYYY-MM-DD", help="land one more day in an existing --out")
    ap.add_argument("--overwrite", action="store_true", help="replace partitions whose content differs")
    args = ap.parse_args(argv)
    if args.append:
        written = append_day(args.out, args.append, overwrite=args.overwrite)
    else:
        written = generate(args.out, args.days, args.start, args.seed, rows_per_day=args.rows_per_day,
                           n_couriers=args.couriers, n_zones=args.zones, overwrite=args.overwrite)
    print(f"wrote {len(written)} partition file(s) under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
