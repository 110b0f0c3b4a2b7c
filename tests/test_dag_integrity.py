"""DAG integrity: every DAG file parses fast and cleanly, with the conventions a platform team expects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ctrain.definition import load_all

DEFINITIONS = sorted(load_all(Path(__file__).resolve().parents[1] / "pipelines").values(), key=lambda d: d.name)

DAGS_DIR = Path(__file__).resolve().parents[1] / "dags"
DAG_FILES = sorted(p for p in DAGS_DIR.glob("*.py") if p.name != "assets.py")
HEAVY_MODULES = ("torch", "mlflow", "feast", "great_expectations", "pandas", "sklearn", "ctrain.featurestore",
                 "ctrain.snapshot", "ctrain.validation", "ctrain.pipeline")


@pytest.fixture(scope="module")
def dagbag(airflow_env):
    from airflow.dag_processing.dagbag import DagBag

    # Airflow puts the DAGs folder on sys.path (that is how `from assets import ...` resolves); do the same.
    sys.path.insert(0, str(DAGS_DIR))
    return DagBag(dag_folder=str(DAGS_DIR))


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}


def test_every_definition_has_a_training_and_an_arrival_dag(dagbag):
    expected = {d.dag_id for d in DEFINITIONS} | {d.arrival_dag_id for d in DEFINITIONS}
    expected |= {f"model_rollback__{d.name}" for d in DEFINITIONS}
    assert set(dagbag.dag_ids) == expected
    assert {d.name for d in DEFINITIONS} >= {"fraud", "delivery_eta"}
    for definition in DEFINITIONS:
        for dag_id in (definition.dag_id, definition.arrival_dag_id):
            dag = dagbag.dags[dag_id]
            assert definition.name in dag.tags
            assert {t.owner for t in dag.tasks} == {definition.owner}


def test_dags_have_tags_retries_docs_and_no_catchup(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.catchup is False, f"{dag_id} must set catchup=False"
        assert dag.doc_md, f"{dag_id} has no doc_md"
        assert dag.start_date is not None and dag.start_date.tzinfo is not None, f"{dag_id}: naive start_date"
        for task in dag.tasks:
            assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


def test_every_task_fails_fast_on_terminal_errors(dagbag):
    # Retries are for retryable failures only: @fail_fast turns a terminal ctrain error into
    # AirflowFailException. Sensors are exempt: with soft_fail that exception would become a skip.
    for dag_id, dag in dagbag.dags.items():
        for task in dag.tasks:
            if task.task_type.endswith("SensorOperator"):
                continue
            assert getattr(task.python_callable, "fails_fast", False), f"{dag_id}.{task.task_id} lacks @fail_fast"


@pytest.mark.parametrize("definition", DEFINITIONS, ids=lambda d: d.name)
def test_continuous_training_wiring(dagbag, definition):
    dag = dagbag.dags[definition.dag_id]
    order = ["build_dataset", "validate", "train", "evaluate", "register", "govern", "promote", "retire"]
    for upstream, downstream in zip(order, order[1:], strict=False):
        assert downstream in dag.get_task(upstream).downstream_task_ids, f"{upstream} -> {downstream} missing"
    assert dag.get_task("materialize_online").upstream_task_ids == {"build_dataset", "validate"}
    assert set(dag.params.keys()) == {"start", "end", "trainer_overrides", "primary_metric_floor"}
    assert dag.params.get_param("primary_metric_floor").resolve(None) is None
    # Scheduled on the definition's cron OR its Assets; the arrival DAG emits the events table's Asset.
    schedule = dag.timetable
    assert [a.name for a in schedule.asset_condition.objects] == definition.schedule.assets
    assert schedule.timetable.expression == definition.schedule.cron
    announce = dagbag.dags[definition.arrival_dag_id].get_task("announce")
    assert [o.name for o in announce.outlets] == [definition.events.table]


def test_trainer_overrides_param_is_the_trainer_config_schema(dagbag):
    import json

    from airflow.sdk.exceptions import ParamValidationError

    from trainer.config import overrides_schema

    generated = json.loads(json.dumps(overrides_schema()))
    stored = json.loads((DAGS_DIR / "trainer_overrides.schema.json").read_text())
    assert stored == generated, "stale: python -m trainer overrides-schema > dags/trainer_overrides.schema.json"
    param = dagbag.dags[DEFINITIONS[0].dag_id].params.get_param("trainer_overrides")
    good = {"optimizer.lr": 0.002, "train.epochs": 5, "model.kwargs": {"hidden_sizes": [128, 64]}}
    assert param.resolve(good) == good
    for bad in ({"optim.lr": 0.002}, {"optimizer.lr": -1}, {"optimizer.name": "adam"},
                {"data.dataset_uri": "file:///elsewhere"}):  # the pipeline owns where data comes from
        with pytest.raises(ParamValidationError):
            param.resolve(bad)


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_no_heavy_imports_at_parse_time(path, airflow_env):
    code = (
        f"import sys, runpy; sys.path.insert(0, {str(DAGS_DIR)!r}); runpy.run_path({str(path)!r});"
        f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=airflow_env).stdout.strip().splitlines()[-1]
    assert out == "[]", f"{path.name} imports heavy modules at parse time: {out}"


def _parse_time_reads(tree: ast.AST) -> list[str]:
    """Variable/connection reads outside @task bodies, i.e. code that runs whenever the file is parsed."""
    found: list[str] = []

    def is_task(fn: ast.FunctionDef) -> bool:
        return any("task" in ast.unparse(d) for d in fn.decorator_list)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef) and is_task(node):
            return  # runs on a worker, not at parse time
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
            node.value.id in {"Variable", "BaseHook", "Connection"} and node.attr in {"get", "get_connection"}
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_parse_time_read_detector_catches_a_read():
    bad = "from airflow.sdk import Variable, dag\n@dag()\ndef d():\n    x = Variable.get('k')\n"
    assert _parse_time_reads(ast.parse(bad)) == ["line 4: Variable.get"]


@pytest.mark.parametrize("path", sorted(DAGS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_no_variable_or_connection_reads_at_parse_time(path):
    assert _parse_time_reads(ast.parse(path.read_text())) == []
