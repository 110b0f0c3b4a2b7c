"""``make demo``: the whole pipeline on embedded defaults, then a summary of what it produced.

Steps: generate data (once), migrate the Airflow SQLite DB, run the ``continuous_training`` DAG with
``airflow dags test`` (full Airflow task execution, in one process), and print what the run produced,
read back from MLflow and the object store. Usage::

    python -m ctrain.demo [--days 60] [--seed 0] [--log FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ctrain.localenv import airflow_env, ui_urls
from ctrain.settings import Settings, get_settings

if TYPE_CHECKING:
    from collections.abc import Mapping

DAG_ID = "continuous_training"


def airflow(args: list[str], env: Mapping[str, str], log_path: Path, echo: bool = False) -> int:
    """Run the Airflow CLI from this venv, appending its output to ``log_path``; progress lines to stdout."""
    cmd = [str(Path(sys.executable).with_name("airflow")), *args]
    with log_path.open("a") as log, subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            log.write(line)
            if echo and ("[DAG TEST] end task" in line or "[DAG TEST] starting" in line):
                task = line.split("task_id=")[1].split()[0] if "task_id=" in line else "?"
                state = "started " if "starting" in line else "finished"
                print(f"  {time.strftime('%H:%M:%S')} {state} {task}", flush=True)
            elif echo and "trainer.progress" in line and " eval:" in line:
                epoch = line[line.index("epoch "):].strip()
                print(f"    {epoch[:150]}", flush=True)
        return proc.wait()


def ensure_data(settings: Settings, days: int, seed: int) -> None:
    from ctrain import datagen

    if (settings.resolved_data_root / "transactions").exists():
        print(f"data: reusing {settings.resolved_data_root}")
        return
    print(f"data: generating {days} days of transactions into {settings.resolved_data_root}")
    datagen.generate(settings.resolved_data_root, days=days, seed=seed)


def summary(settings: Settings) -> str:
    """What the newest run produced, read back from the registry and the run (not from the DAG's memory)."""
    from ctrain import registry

    client = registry.get_client(settings)
    name = settings.model_name
    version = registry.alias_version(client, name, registry.CHAMPION)
    if version is None:
        return f"no {name}@champion in the registry: the run did not promote a model (see the log)"
    mv = client.get_model_version(name, version)
    run = client.get_run(mv.run_id)
    m, t = run.data.metrics, mv.tags
    urls = ui_urls(settings)
    ui = f"make up, then open {urls['airflow']} (Airflow, login printed by make up) and {urls['mlflow']} (MLflow)"
    lines = [
        "",
        "=== ctrain demo: summary ===",
        f"dataset version     : {t.get('dataset_version')}  (feature service {t.get('feature_service')})",
        f"snapshot            : {settings.resolved_object_root}/datasets/{t.get('dataset_version')}",
        f"validation          : success (GX result {t.get('gx_result_id')})",
        f"  report / docs     : {run.data.tags.get('gx_report_uri')}",
        f"                      {run.data.tags.get('gx_docs_uri')}",
        f"MLflow run          : {mv.run_id}  ({settings.resolved_tracking_uri})",
        f"model               : {name} v{version}  aliases: {', '.join(sorted(mv.aliases))}",
        f"checkpoint          : {t.get('checkpoint')}",
        f"test metrics        : roc_auc={m.get('test_roc_auc', float('nan')):.4f} "
        f"pr_auc={m.get('test_pr_auc', float('nan')):.4f} loss={m.get('test_loss', float('nan')):.4f}",
        f"UIs                 : {ui}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=60, help="days of data to generate on first run")
    parser.add_argument("--seed", type=int, default=0, help="data generator seed")
    args = parser.parse_args(argv)

    started = time.monotonic()
    settings = get_settings()
    env = airflow_env(settings)
    os.environ.update(env)  # datagen and summary read the same settings as the DAG
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"demo-{time.strftime('%Y%m%dT%H%M%S')}.log"

    ensure_data(settings, args.days, args.seed)
    print(f"airflow: migrating metadata DB ({env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']})")
    if airflow(["db", "migrate"], env, log_path) != 0:
        print(f"airflow db migrate failed; see {log_path}")
        return 1
    print(f"airflow: running DAG {DAG_ID} (full log: {log_path})")
    code = airflow(["dags", "test", DAG_ID], env, log_path, echo=True)
    if code != 0:
        print(f"DAG run failed (exit {code}); see {log_path}")
        return code
    print(summary(settings))
    print(f"demo took {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
