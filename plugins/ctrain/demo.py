"""``make demo``: the whole pipeline on embedded defaults, then a summary of what it produced.

Steps: generate the pipeline's example data (once, with its definition's ``example.datagen``), migrate
the Airflow SQLite DB, run the pipeline's ``continuous_training__<name>`` DAG with ``airflow dags test``
(full Airflow task execution, in one process), and print what the run produced, read back from MLflow
and the object store. The pipeline is ``CTRAIN_PIPELINE`` (``make demo PIPELINE=<name>``), else the settings' default.
Usage::

    python -m ctrain.demo [--days N] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ctrain import layout
from ctrain.errors import ConfigError
from ctrain.localenv import airflow_env, ui_urls
from ctrain.settings import Settings, get_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ctrain.definition import PipelineDefinition

# Where a definition's example generator may live: the examples package, or beside the definition's own
# model code (its module). A definition is data; it must not make the demo import arbitrary modules.
EXAMPLES_PACKAGE = "ctrain_examples"


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


def example_generator(definition: PipelineDefinition) -> Callable[..., object]:
    """The definition's ``example.datagen`` function, imported only from an allowed module."""
    if definition.example is None:
        raise ConfigError(f"pipeline {definition.name!r} has no example.datagen: land its data under the "
                          "data root yourself, then run its DAG")
    module, _, function = definition.example.datagen.partition(":")
    if not module.startswith(f"{EXAMPLES_PACKAGE}."):
        raise ConfigError(f"example.datagen {definition.example.datagen!r} of pipeline {definition.name!r}: "
                          f"the demo imports generators only from {EXAMPLES_PACKAGE}")
    return getattr(importlib.import_module(module), function)


def ensure_data(settings: Settings, days: int | None, seed: int) -> None:
    definition = settings.definition
    table = definition.events.table
    if (settings.resolved_data_root / table).exists():
        print(f"data: reusing {settings.resolved_data_root / table}")
        return
    generate = example_generator(definition)
    days = days or (definition.example.days if definition.example else 0)
    print(f"data: generating {days} days of {table} into {settings.resolved_data_root}")
    generate(settings.resolved_data_root, days=days, seed=seed)


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
        f"=== ctrain demo: summary (pipeline {settings.pipeline}) ===",
        f"dataset version     : {t.get('dataset_version')}  (feature service {t.get('feature_service')})",
        f"snapshot            : {layout.dataset_uri(settings.resolved_object_root, str(t.get('dataset_version')))}",
        f"validation          : success (GX result {t.get('gx_result_id')})",
        f"  report / docs     : {run.data.tags.get('gx_report_uri')}",
        f"                      {run.data.tags.get('gx_docs_uri')}",
        f"MLflow run          : {mv.run_id}  ({settings.resolved_tracking_uri})",
        f"model               : {name} v{version}  aliases: {', '.join(sorted(mv.aliases))}",
        f"checkpoint          : {t.get('checkpoint')}",
        f"test metrics        : {_metric_line(settings.definition, m)}",
        *_decision_lines(settings, mv.run_id, t),
        f"model card          : {t.get('model_card', 'none logged')}",
        f"alias history       : ctrain history {name}   (ctrain audit verify {name} checks the chain)",
        f"roll back           : ctrain rollback {name} --to previous --reason '...'",
        f"UIs                 : {ui}",
    ]
    return "\n".join(lines)


def _decision_lines(settings: Settings, run_id: str, tags: Mapping[str, str]) -> list[str]:
    """The governance decision of the version: verdict, policy, and every rule's reason (the intervals are
    in them), from the run's ``governance/decision.json``."""
    import mlflow

    from ctrain import registry
    from ctrain.pipeline import DECISION_ARTIFACT

    head = (f"decision            : {tags.get('governance.decision', 'not recorded')} under policy "
            f"{tags.get('governance.policy_version')} (sha256 {str(tags.get('governance.policy_sha256'))[:12]})")
    try:
        with registry.mlflow_at(settings):
            decision = mlflow.artifacts.load_dict(f"runs:/{run_id}/{DECISION_ARTIFACT}")
    except Exception as exc:  # the summary still prints; the reason says why the reasons are missing
        return [head, f"  reasons           : not readable ({type(exc).__name__})"]
    return [head, *(f"  {reason}" for reason in decision.get("reasons", []))]


def _metric_line(definition: PipelineDefinition, metrics: Mapping[str, float]) -> str:
    """'<primary>=0.1234 (primary, lower is better) <report>=... loss=...': the definition's metrics, primary first."""
    # The trainer logs some test metrics itself; evaluate logs every one of the definition as eval_<name>.
    values = [f"{name.removeprefix('test_')}={metrics.get(name, metrics.get(f'eval_{name}', float('nan'))):.4f}"
              for name in definition.test_metrics]
    values[0] += f" (primary, {definition.metrics.direction} is better)"
    return " ".join([*values, f"loss={metrics.get('test_loss', float('nan')):.4f}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=None,
                        help="days of data to generate on first run (default: the definition's example.days)")
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
    dag_id = settings.definition.dag_id
    print(f"airflow: running DAG {dag_id} (full log: {log_path})")
    code = airflow(["dags", "test", dag_id], env, log_path, echo=True)
    if code != 0:
        print(f"DAG run failed (exit {code}); see {log_path}")
        return code
    print(summary(settings))
    print(f"demo took {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
