"""Benchmark of the data plane: snapshot build and the GX gate against plain-pandas equivalents.

    flock /tmp/ctrain-bench.lock .venv/bin/python bench/data_plane.py              # 1e5 and 1e6 events
    flock /tmp/ctrain-bench.lock .venv/bin/python bench/data_plane.py --sizes 1e5  # quick

For each size it generates a dataset (30 days, customers = events/50, merchants = events/1000), then, each in
a fresh subprocess so peak memory is measured per case:

- build:      ``ctrain.snapshot.build_snapshot`` (entity checks, Feast duckdb point-in-time join in chunks,
              split, hashing, parquet + manifest writes), after ``apply_feature_repo``
- merge_asof: the baseline, a pandas ``merge_asof`` point-in-time join on the same files (read, join each
              feature view backwards with the TTL as tolerance, sort); no checks, no writes
- gx:         ``ctrain.validation.run_suites`` (GX 1.x checkpoints, then Data Docs) on the snapshot frame
- pandas:     the same checks as vectorized pandas expressions on the same frame

Times are the best of ``--repeat`` runs in the same process (the machine is shared; the minimum is the
least disturbed run). Peak memory is the growth of the process's peak RSS over its RSS just before the
first measured run, so the ~0.5 GB of imported libraries is not counted; "frame" is the in-memory size of
the resulting snapshot DataFrame. ``gx`` is the expectation suites' evaluation, compared with the pandas
checks (same checks, same frame); GX's Data Docs rendering, which the pandas checks have no equivalent
for, is reported in its own column and in ``gx_with_docs_over_pandas_*``. Prints a table of side-by-side
ratios; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

DAYS = 30


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _settings(home: Path):
    from ctrain.settings import Settings

    return Settings(home=home, data_root=str(home / "data"), object_root=f"file://{home / 'objects'}",
                    pipeline="fraud")


# ------------------------------------------------------------------------------------------------ workers


def worker_build(home: Path, repeat: int) -> dict:
    import shutil

    from ctrain import featurestore
    from ctrain import snapshot as snapshots

    s = _settings(home)
    featurestore.apply_feature_repo(s)
    # Warm-up on the first 3 days, as in a long-running worker: Feast imports its offline store lazily.
    snapshots.build_snapshot(s, end=(date(2026, 1, 3)), val_days=1, test_days=1)
    before = _rss_mb()
    times = []
    for _ in range(repeat):
        shutil.rmtree(home / "objects" / "datasets", ignore_errors=True)  # each run writes the snapshot
        t = time.perf_counter()
        info = snapshots.build_snapshot(s)
        times.append(time.perf_counter() - t)
        assert info.created
    peak = _peak_mb() - before
    _, frames = snapshots.load_snapshot(info.uri)
    frame_mb = sum(f.memory_usage(deep=True).sum() for f in frames.values()) / 2**20
    return {
        "seconds": min(times),
        "all_seconds": times,
        "peak_mb": peak,
        "frame_mb": frame_mb,
        "rows": info.manifest["rows"],
        "uri": info.uri,
    }


def merge_asof_join(data: Path):
    """The baseline point-in-time join: pandas merge_asof per feature view, TTL as tolerance."""
    import pandas as pd
    import pyarrow.dataset as ds

    from ctrain_examples import fraud

    tx = (
        ds.dataset(data / "transactions", format="parquet", partitioning="hive")
        .to_table(
            columns=["transaction_id", "customer_id", "merchant_id", "event_timestamp", "amount", "label"]
        )
        .to_pandas()
    )
    tx = tx.sort_values("event_timestamp", kind="stable")
    for table, key in [(fraud.CUSTOMER_STATS, "customer_id"), (fraud.MERCHANT_STATS, "merchant_id")]:
        cols = [key, "event_timestamp", "created_timestamp", *fraud.FEATURE_TABLES[table]]
        feats = (
            ds.dataset(data / "features" / table, format="parquet", partitioning="hive")
            .to_table(columns=cols)
            .to_pandas()
        )
        # Latest created row wins among rows with the same event time, as in Feast.
        feats = feats.sort_values(["event_timestamp", "created_timestamp"]).drop(columns="created_timestamp")
        tx = pd.merge_asof(
            tx,
            feats,
            on="event_timestamp",
            by=key,
            direction="backward",
            tolerance=pd.Timedelta(days=2),
            allow_exact_matches=True,
        )
    return tx.sort_values(["event_timestamp", "transaction_id"], ignore_index=True)


def worker_merge_asof(home: Path, repeat: int) -> dict:
    before = _rss_mb()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        tx = merge_asof_join(home / "data")
        times.append(time.perf_counter() - t)
        rows, frame_mb = len(tx), tx.memory_usage(deep=True).sum() / 2**20
        del tx  # one result alive at a time, as in the build
    return {
        "seconds": min(times),
        "all_seconds": times,
        "peak_mb": _peak_mb() - before,
        "rows": rows,
        "frame_mb": frame_mb,
    }


def pandas_checks(manifest: dict, df, cfg) -> list[str]:
    """The GX snapshot and split suites as vectorized pandas on the same frame (the gx baseline)."""
    feats, label, ts = manifest["feature_columns"], manifest["label_column"], manifest["timestamp_column"]
    cols = [manifest["id_column"], *manifest["entity_columns"], ts, *feats, label]
    failed = []
    if list(df.columns) != cols:
        failed.append("columns")
    if len(df) < cfg.min_rows:
        failed.append("rows")
    for c in cols:
        if df[c].isna().any():
            failed.append(f"null {c}")
    for c in [manifest["id_column"], *manifest["entity_columns"], label]:
        if df[c].dtype != "int64":
            failed.append(f"type {c}")
    if str(df[ts].dtype) != "datetime64[us, UTC]":
        failed.append(f"type {ts}")
    for c in feats:
        if df[c].dtype != "float64":
            failed.append(f"type {c}")
        lo, hi = cfg.feature_ranges.get(c, (None, None))
        if (lo is not None and (df[c] < lo).any()) or (hi is not None and (df[c] > hi).any()):
            failed.append(f"range {c}")
    if not df[label].isin([0, 1]).all():
        failed.append("label set")
    if not df[manifest["id_column"]].is_unique:
        failed.append("unique id")
    if df.duplicated([*manifest["entity_columns"], ts]).any():
        failed.append("unique entity/time")
    start = 0
    for s in ("train", "val", "test"):
        rows = manifest["splits"][s]["rows"]
        split_labels = df[label].iloc[start:start + rows]
        start += rows
        lo, hi = cfg.label_rate
        if rows < cfg.min_rows_per_split or not lo <= split_labels.mean() <= hi:
            failed.append(f"split {s}")
    return failed


def worker_gx(uri: str, repeat: int) -> dict:
    from ctrain import validation
    from ctrain.settings import Settings
    from ctrain.snapshot import read_frame

    manifest, snapshot = read_frame(uri)
    cfg = validation.suite_config(Settings(pipeline="fraud").definition)  # the data is the fraud example's
    with tempfile.TemporaryDirectory() as docs:  # warm-up: GX builds its metric registry on first use
        small = {**manifest, "splits": {s: {"rows": 1000} for s in ("train", "val", "test")}}
        validation.run_suites(small, snapshot.head(3000), cfg, docs)
    gx_runs, pd_runs = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as docs:
            _, gx_failed, stats = validation.run_suites(manifest, snapshot, cfg, docs)
        gx_runs.append(stats["seconds"])
        t = time.perf_counter()
        pd_failed = pandas_checks(manifest, snapshot, cfg)
        pd_runs.append(time.perf_counter() - t)
    best = min(gx_runs, key=lambda r: r["validation"] + r["data_docs"])
    return {
        "gx_seconds": min(r["validation"] for r in gx_runs),
        "docs_seconds": min(r["data_docs"] for r in gx_runs),
        "gx_with_docs_seconds": best["validation"] + best["data_docs"],
        "pandas_seconds": min(pd_runs),
        "gx_failed": len(gx_failed),
        "pandas_failed": len(pd_failed),
    }


# ------------------------------------------------------------------------------------------------ driver


def _run_worker(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"worker {args[0]} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_size(n: int, root: Path, repeat: int) -> dict:
    from ctrain_examples import fraud

    home = root / f"n{n}"
    t = time.perf_counter()
    fraud.generate(
        home / "data",
        days=DAYS,
        rows_per_day=n // DAYS,
        n_customers=max(n // 50, 100),
        n_merchants=max(n // 1000, 50),
    )
    gen_seconds = time.perf_counter() - t
    build = _run_worker("build", str(home), str(repeat))
    base = _run_worker("merge_asof", str(home), str(repeat))
    gx = _run_worker("gx", build["uri"], str(repeat))
    return {"n": n, "gen_seconds": gen_seconds, "build": build, "merge_asof": base, "gx": gx}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6", help="comma-separated event counts")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best time is reported")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        kind, arg, repeat = args.worker
        fn = {"build": worker_build, "merge_asof": worker_merge_asof, "gx": worker_gx}[kind]
        print(json.dumps(fn(Path(arg) if kind != "gx" else arg, int(repeat))))
        return 0

    sizes = [int(float(s)) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="ctrain-bench-") as tmp:
        results = [bench_size(n, Path(tmp), args.repeat) for n in sizes]

    head = (
        f"{'events':>9} | {'build s':>7} | {'asof s':>6} | {'build/asof':>10} | {'peak MB':>7} | "
        f"{'frame MB':>8} | {'peak/frame':>10} | {'asof peak MB':>12} | {'gx s':>5} | {'pandas s':>8} | "
        f"{'gx/pandas':>9} | {'docs s':>6} | {'gx+docs/pandas':>14}"
    )
    print(head)
    print("-" * len(head))
    summary: dict[str, float | int] = {}
    for r in results:
        b, m, g = r["build"], r["merge_asof"], r["gx"]
        ratio = b["seconds"] / m["seconds"]
        mem = b["peak_mb"] / b["frame_mb"]
        gxr = g["gx_seconds"] / g["pandas_seconds"]
        gxd = g["gx_with_docs_seconds"] / g["pandas_seconds"]
        print(
            f"{r['n']:>9,} | {b['seconds']:>7.2f} | {m['seconds']:>6.2f} | {ratio:>10.2f} | "
            f"{b['peak_mb']:>7.0f} | {b['frame_mb']:>8.0f} | {mem:>10.2f} | {m['peak_mb']:>12.0f} | "
            f"{g['gx_seconds']:>5.2f} | {g['pandas_seconds']:>8.3f} | {gxr:>9.2f} | {g['docs_seconds']:>6.2f} | "
            f"{gxd:>14.2f}"
        )
        tag = f"1e{len(str(r['n'])) - 1}" if str(r["n"]).strip("0") == "1" else str(r["n"])
        summary[f"build_over_merge_asof_{tag}"] = round(ratio, 3)
        summary[f"peak_mem_over_frame_{tag}"] = round(mem, 3)
        summary[f"gx_over_pandas_{tag}"] = round(gxr, 3)
        summary[f"gx_with_docs_over_pandas_{tag}"] = round(gxd, 3)
        summary[f"build_seconds_{tag}"] = round(b["seconds"], 3)
        summary[f"merge_asof_seconds_{tag}"] = round(m["seconds"], 3)
        summary[f"merge_asof_peak_over_frame_{tag}"] = round(m["peak_mb"] / m["frame_mb"], 3)
        if b["rows"] != m["rows"]:
            print(f"  note: build kept {b['rows']} rows, merge_asof {m['rows']}")
        if g["gx_failed"] or g["pandas_failed"]:
            print(f"  note: gx failed {g['gx_failed']} expectations, pandas {g['pandas_failed']} checks")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    raise SystemExit(main())
