"""A third pipeline added the way README's "Add your own pipeline" says, with no edit to ctrain: a
multiclass ``ticket_priority`` pipeline whose definition, Feast declarations, model package and landed
data all live in a directory outside the repository, reached only through ``CTRAIN_*`` settings.

It runs the definition check, parses the DAGs (``continuous_training__ticket_priority`` is in the
DagBag) and the pipeline's steps snapshot -> validate -> train (2-process torchrun, the user's model
factory) -> evaluate -> register -> govern -> promote, then scores the champion as served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrain.settings import PROJECT_ROOT

if TYPE_CHECKING:
    from pathlib import Path

NAME = "ticket_priority"
DAYS, START, TICKETS_PER_DAY, ACCOUNTS = 21, date(2026, 1, 1), 150, 60
TS = pa.timestamp("us", tz="UTC")  # the landed timestamp type (pipelines/README.md)

# ---- the user's files ------------------------------------------------------------------------------
DEFINITION = """\
name: ticket_priority
owner: support-analytics
description: Routes a new support ticket to a priority queue (low, normal, urgent) when it is opened.
model:
  name: ticket_priority
  description: Priority class of a support ticket (0 low, 1 normal, 2 urgent).
feature_service: ticket_priority_v1
feature_tables: [features/account_stats]
events:
  table: tickets
  id_column: ticket_id
  timestamp_column: opened_at
  entity_columns: [account_id]
  label_column: priority
  event_features: [message_length]
task:
  type: multiclass
  num_classes: 3
metrics:
  primary: accuracy
  direction: higher
  report: [macro_f1, log_loss]
validation:
  min_rows: 1000
  min_rows_per_split: 100
  feature_ranges:
    message_length: {{min: 0.0, max: 100000.0}}
    account_open_tickets_7d: {{min: 0.0, max: 1000.0}}
    account_age_days: {{min: 0.0, max: 36500.0}}
governance:
  policy: policies/ticket_priority.yaml
training:
  config: {trainer_config}
  launcher: local
  nproc_per_node: 2
schedule:
  cron: null
  assets: [tickets]
"""

# The policy file, next to the definition (governance.policy is relative to the definition's directory).
POLICY = """\
version: ticket-priority-v1
floors:
  accuracy: 0.5       # three balanced classes: a constant scores ~0.33
non_inferiority:
  metric: accuracy
  margin: 0.02
  method: bootstrap
  samples: 500
slices:
  - column: message_length
    bins: [0, 300, 800, .inf]
    min_rows: 50
    floor: 0.4
"""

FEATURE_STORE = """\
project: support
provider: local
registry:
  registry_type: file
  path: ${CTRAIN_HOME}/feast/registry.db
online_store:
  type: sqlite
  path: ${CTRAIN_HOME}/feast/online_store.db
offline_store:
  type: duckdb
entity_key_serialization_version: 3
"""

FEAST_DECLARATIONS = '''\
"""Feast declarations of the ticket_priority pipeline: one entity, one daily feature table."""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, Int64

DATA_ROOT = Path(os.environ["CTRAIN_DATA_ROOT"])

account = Entity(name="account", join_keys=["account_id"], value_type=ValueType.INT64)

account_stats = FeatureView(
    name="account_stats",
    entities=[account],
    ttl=timedelta(days=2),
    schema=[
        Field(name="account_id", dtype=Int64),
        Field(name="account_open_tickets_7d", dtype=Float64),
        Field(name="account_age_days", dtype=Float64),
    ],
    source=FileSource(
        name="account_stats_source",
        path=str(DATA_ROOT / "features" / "account_stats" / "date=*" / "*.parquet"),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
    ),
    online=True,
)

ticket_priority_v1 = FeatureService(name="ticket_priority_v1", features=[account_stats])
'''

MODEL_PACKAGE = '''\
"""The support team's model: a standardized MLP with a LayerNorm (trainer factory contract)."""

from torch import nn

from trainer.model import ModelSpec, Standardize


def build(spec: ModelSpec, width: int = 16) -> nn.Module:
    return nn.Sequential(Standardize(spec.feature_mean, spec.feature_std), nn.Linear(spec.num_features, width),
                         nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, spec.num_outputs))
'''

TRAINER_CONFIG = """\
seed: 0
task:
  type: multiclass
  num_classes: 3
model:
  factory: "support_models.priority:build"
  kwargs: {width: 16}
optimizer:
  name: adamw
  lr: 0.02
train:
  epochs: 4
  batch_size: 64
early_stopping:
  monitor: val_loss
  mode: min
  patience: 2
tracking:
  system_metrics: false
"""


def _land(data_root: Path) -> None:
    """What the support system lands daily: tickets (labelled a week later) and account aggregates."""
    rng = np.random.default_rng(0)
    age = rng.uniform(10, 2000, ACCOUNTS)
    for d in range(DAYS):
        day = START + timedelta(days=d)
        midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
        open_7d = rng.poisson(3, ACCOUNTS).astype("float64")
        stats = pa.table({
            "account_id": pa.array(np.arange(ACCOUNTS), pa.int64()),
            "event_timestamp": pa.array([midnight] * ACCOUNTS, TS),
            "created_timestamp": pa.array([midnight + timedelta(minutes=5)] * ACCOUNTS, TS),
            "account_open_tickets_7d": open_7d, "account_age_days": age + d,
        })
        account = rng.integers(0, ACCOUNTS, TICKETS_PER_DAY)
        length = rng.gamma(2.0, 300.0, TICKETS_PER_DAY)
        seconds = np.sort(rng.integers(60, 86_000, TICKETS_PER_DAY))
        # Urgency grows with the account's open tickets and the message length, shrinks with its age.
        z = 0.6 * open_7d[account] + length / 400 - (age[account] + d) / 800 + rng.normal(0, 0.4, TICKETS_PER_DAY)
        priority = np.digitize(z, np.quantile(z, [1 / 3, 2 / 3]))
        tickets = pa.table({
            "ticket_id": pa.array(d * TICKETS_PER_DAY + np.arange(TICKETS_PER_DAY), pa.int64()),
            "account_id": pa.array(account, pa.int64()),
            "opened_at": pa.array([midnight + timedelta(seconds=int(s)) for s in seconds], TS),
            "message_length": length, "priority": pa.array(priority, pa.int64()),
        })
        for table, data in (("features/account_stats", stats), ("tickets", tickets)):
            path = data_root / table / f"date={day.isoformat()}" / "part-0.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(data, path)


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's directory (outside the repository) with every file the README lists."""
    root = tmp_path_factory.mktemp("support-team")
    assert not root.resolve().is_relative_to(PROJECT_ROOT.resolve())
    (root / "pipelines").mkdir()
    (root / "pipelines" / f"{NAME}.yaml").write_text(
        DEFINITION.format(trainer_config=root / "configs" / f"{NAME}.yaml"))
    (root / "pipelines" / "policies").mkdir()
    (root / "pipelines" / "policies" / f"{NAME}.yaml").write_text(POLICY)
    (root / "feature_repo").mkdir()
    (root / "feature_repo" / "feature_store.yaml").write_text(FEATURE_STORE)
    (root / "feature_repo" / "ticket_priority.py").write_text(FEAST_DECLARATIONS)
    (root / "src" / "support_models").mkdir(parents=True)
    (root / "src" / "support_models" / "__init__.py").write_text("")
    (root / "src" / "support_models" / "priority.py").write_text(MODEL_PACKAGE)
    (root / "configs").mkdir()
    (root / "configs" / f"{NAME}.yaml").write_text(TRAINER_CONFIG)
    _land(root / "home" / "data")
    return root


@pytest.fixture
def env(user: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Settings for the user's pipeline, as environment variables only."""
    variables = {
        "CTRAIN_HOME": str(user / "home"),
        "CTRAIN_PIPELINES_DIR": str(user / "pipelines"),
        "CTRAIN_FEATURE_REPO": str(user / "feature_repo"),
        "CTRAIN_PIPELINE": NAME,
        "CTRAIN_MODEL_FACTORY_PREFIXES": "trainer.model,support_models",
        # The model package is importable by the trainer processes (the local launcher passes the env on).
        "PYTHONPATH": os.pathsep.join([str(user / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    for key in [k for k in os.environ if k.startswith(("CTRAIN_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    return variables


def test_the_definition_checks(user: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ctrain.definition", "check", str(user / "pipelines" / f"{NAME}.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_its_dags_are_generated(user: Path, env: dict[str, str]) -> None:
    from support import make_env

    parse = ("import json, sys; from airflow.dag_processing.dagbag import DagBag; "
             f"bag = DagBag(dag_folder={str(PROJECT_ROOT / 'dags')!r}); "
             "print(json.dumps({'ids': sorted(bag.dag_ids), 'errors': {k: str(v) for k, v in bag.import_errors.items()}, "
             f"'owner': sorted({{t.owner for t in bag.dags['continuous_training__{NAME}'].tasks}})}}))")
    airflow = {k: v for k, v in make_env(user / "parse").items() if k.startswith("AIRFLOW")}
    parse_env = {**os.environ, **airflow, **env,
                 "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "dags"), env["PYTHONPATH"]])}
    proc = subprocess.run([sys.executable, "-c", parse], env=parse_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert parsed["errors"] == {}
    assert parsed["ids"] == [f"continuous_training__{NAME}", f"model_rollback__{NAME}", f"tickets_arrival__{NAME}"]
    assert parsed["owner"] == ["support-analytics"]


@pytest.mark.slow  # a 2-process torchrun training (about a minute)
def test_its_steps_run_from_snapshot_to_champion(user: Path, env: dict[str, str]) -> None:
    import mlflow
    import pandas as pd

    from ctrain import pipeline, registry
    from ctrain.settings import get_settings
    from ctrain.snapshot import load_snapshot

    settings = get_settings()
    assert settings.pipeline == NAME and settings.model_factory_prefixes == ("trainer.model", "support_models")
    snapshot = pipeline.build_dataset(settings)
    assert snapshot["feature_service"] == "ticket_priority_v1"
    validation = pipeline.validate(settings, snapshot)
    assert validation["success"]
    training = pipeline.train(settings, snapshot, validation, dag_id=f"continuous_training__{NAME}",
                              dag_run_id="r1")
    assert training["metrics"]["test_accuracy"] > 0.6
    params = mlflow.MlflowClient(settings.resolved_tracking_uri).get_run(training["mlflow_run_id"]).data.params
    assert params["model.factory"] == "support_models.priority:build"  # the user's model trained
    evaluation = pipeline.evaluate(settings, training, snapshot)
    challenger = evaluation["challenger"]
    assert set(challenger) == {"test_accuracy", "test_macro_f1", "test_log_loss", "test_rows"}
    assert challenger["test_accuracy"] > 0.6  # learnt the rule (chance: 0.33)
    registration = pipeline.register(settings, training, snapshot, validation, dag_run_id="r1")
    assert registration["model"] == "ticket_priority"
    # The user's model package is on the version (a plain module on PYTHONPATH, so no installed version).
    tags = registry.get_client(settings).get_model_version("ticket_priority", registration["version"]).tags
    assert tags["model_package"] == "support_models"
    assert tags["model_package_version"] == "unknown (not an installed distribution)"
    decision = pipeline.govern(settings, evaluation)
    promoted = pipeline.promote(settings, registration, evaluation, decision, dag_run_id="r1")
    assert promoted["version"] == registration["version"]

    # The champion, as served: one probability column per class, reproducing the test accuracy.
    manifest, splits = load_snapshot(snapshot["uri"])
    mlflow.set_tracking_uri(settings.resolved_tracking_uri)
    served = mlflow.pyfunc.load_model("models:/ticket_priority@champion").predict(
        splits["test"][manifest["feature_columns"]])
    assert list(served.columns) == ["class_0", "class_1", "class_2"]
    accuracy = float((served.to_numpy().argmax(axis=1) == splits["test"]["priority"].to_numpy()).mean())
    assert accuracy == pytest.approx(challenger["test_accuracy"], abs=1e-9)
    assert isinstance(served, pd.DataFrame)
