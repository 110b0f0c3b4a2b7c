"""Benchmark (not a test): what ``python -m ctrain.backup`` costs next to the plain tools it wraps.

    flock /tmp/ctrain-bench.lock .venv/bin/python bench/backup.py                # 512 MB of objects + 1M rows
    flock /tmp/ctrain-bench.lock .venv/bin/python bench/backup.py --mb 32 --rows 100000   # smoke run

A ``file://`` object root of ``--mb`` MB (64 checkpoint-sized objects plus 200 small JSON records) and one
Postgres database (``--postgres``, a role that may create databases; the database ``ctrain_bench_backup_*``
is created and dropped) with a ``--rows`` row table stand in for a deployment (as Airflow's database).
Each step of ``ctrain.backup`` (called in-process, so interpreter start-up is not counted) is timed next to
its baseline: backup vs ``pg_dump -Fc`` + ``shutil.copytree``; verify vs ``sha256sum`` of the same files
(hashlib in one pass); restore vs ``dropdb``/``createdb`` + ``pg_restore --single-transaction`` +
``shutil.copytree``. Best of ``--repeats``. The table is printed first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from ctrain.backup import Database, backup, restore, verify  # noqa: E402
from ctrain.settings import Settings  # noqa: E402


def _make_store(root: Path, mb: int) -> int:
    rng = os.urandom
    big = mb * (1 << 20) // 64
    for i in range(64):
        path = root / "checkpoints" / f"run{i // 8}" / f"step-{i:08d}" / "shard.distcp"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng(big))
    for i in range(200):
        path = root / "audit" / "model" / f"{i:015d}-v{i}-promote.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": str(i), "reasons": ["ok"] * 10}))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    server = Database.from_url("airflow", args.postgres)
    dbname = f"ctrain_bench_backup_{uuid.uuid4().hex[:8]}"
    url = f"postgresql://{server.user}@{server.host}:{server.port}/{dbname}"
    db = Database.from_url("airflow", url)
    pg_env = {**os.environ, **db.libpq_env()}
    with tempfile.TemporaryDirectory(prefix="ctrain-bench-backup-") as tmp_name:
        tmp = Path(tmp_name)
        objects = tmp / "objects"
        store_bytes = _make_store(objects, args.mb)
        with server.connect(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{dbname}"')
        try:
            with db.connect(autocommit=True) as conn, conn.cursor() as cur:
                cur.execute("CREATE TABLE task_instance (id bigint primary key, dag_id text, state text, "
                            "payload text)")
                cur.execute("INSERT INTO task_instance SELECT i, 'dag_' || (i %% 50), 'success', md5(i::text) "
                            "|| md5((i * 7)::text) FROM generate_series(1, %s) AS i", (args.rows,))
            os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = url
            for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_CONFIG_PATH"):
                os.environ.pop(key, None)
            settings = Settings(home=tmp / "home", object_root=f"file://{objects}",
                                mlflow_artifact_root=str(tmp / "mlartifacts"))
            made: list[str] = []

            def ctrain_backup() -> None:
                made.append(backup(settings, to=f"file://{tmp / 'backups'}")[0])

            def plain_backup() -> None:
                out = tmp / "plain"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                subprocess.run(["pg_dump", "-Fc", f"--file={out / 'db.dump'}"], env=pg_env, check=True)
                shutil.copytree(objects, out / "objects")

            backup_s = _best(ctrain_backup, args.repeats)
            plain_backup_s = _best(plain_backup, args.repeats)
            uri = made[-1]
            files = [p for p in Path(uri.removeprefix("file://")).rglob("*") if p.is_file()]

            def plain_hash() -> None:
                for path in files:
                    with path.open("rb") as fh:
                        hashlib.file_digest(fh, "sha256")

            verify_s = _best(lambda: verify(uri, settings), args.repeats)
            plain_verify_s = _best(plain_hash, args.repeats)

            def plain_restore() -> None:
                subprocess.run(["dropdb", "--force", dbname], env=pg_env, check=True)
                subprocess.run(["createdb", dbname], env=pg_env, check=True)
                subprocess.run(["pg_restore", "--single-transaction", f"--dbname={dbname}",
                                str(tmp / "plain" / "db.dump")], env=pg_env, check=True)
                shutil.rmtree(objects)
                shutil.copytree(tmp / "plain" / "objects", objects)

            restore_s = _best(lambda: restore(uri, settings, force=True), args.repeats)
            plain_restore_s = _best(plain_restore, args.repeats)
            manifest = json.loads(Path(uri.removeprefix("file://"), "manifest.json").read_text())
            dump_bytes = manifest["databases"]["airflow"]["bytes"]
        finally:
            with server.connect(autocommit=True) as conn, conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    rows = [("backup", backup_s, plain_backup_s, "pg_dump -Fc + copytree"),
            ("verify", verify_s, plain_verify_s, "sha256 of every file"),
            ("restore", restore_s, plain_restore_s, "dropdb/createdb + pg_restore + copytree")]
    print(f"objects {store_bytes / 1e6:.0f} MB in {manifest['objects']['count']} files, "
          f"database dump {dump_bytes / 1e6:.1f} MB ({args.rows} rows); best of {args.repeats}")
    print("| step | ctrain.backup s | baseline s | ratio | baseline |\n| --- | ---: | ---: | ---: | --- |")
    for step, ours, plain, what in rows:
        print(f"| {step} | {ours:.2f} | {plain:.2f} | {ours / plain:.2f} | {what} |")
    print(json.dumps({"objects_bytes": store_bytes, "objects": manifest["objects"]["count"],
                      "dump_bytes": dump_bytes, "rows": args.rows,
                      **{f"{step}_s": round(ours, 3) for step, ours, _, _ in rows},
                      **{f"{step}_baseline_s": round(plain, 3) for step, _, plain, _ in rows}}))


if __name__ == "__main__":
    main()
