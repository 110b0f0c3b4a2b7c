"""
### continuous_training

Features from Feast -> Great Expectations gate -> DDP training (torchrun) -> evaluation -> MLflow
registry -> governance -> promotion; validated features are also materialized to the online store.

Runs daily at 03:00 UTC **or** as soon as a new `transactions` partition lands (Asset event), and from
the UI with the Params below. Re-running for the same data and config resumes or reuses the earlier
training (run key = dag, dataset version, config): it never trains or registers twice.

Task code lives in `plugins/ctrain/pipeline.py`; this file is wiring only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from assets import TRANSACTIONS
from ctrain.errors import fail_fast
from ctrain.params import trainer_overrides_schema
from ctrain.settings import get_settings

# Generated from the trainer's config models (`python -m trainer overrides-schema`; a test keeps it
# current) and narrowed by the operator's settings (factory allow-list, ceilings; env vars only): a
# trigger with an unknown key, a bad value or one beyond a limit is refused before anything runs.
TRAINER_OVERRIDES_SCHEMA = trainer_overrides_schema(
    json.loads((Path(__file__).parent / "trainer_overrides.schema.json").read_text()), get_settings()
)

# Every task wears @fail_fast: a terminal error (bad Param, bad data, a failed gate) fails at once,
# only retryable ones (lost peer, storage, MLflow unavailable) spend these retries.
DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 1,
    "retry_delay": pendulum.duration(seconds=30),
}


@dag(
    dag_id="continuous_training",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 3 * * *", timezone="UTC"), assets=[TRANSACTIONS]
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    tags=["ctrain", "training", "fraud"],
    params={
        "start": Param(None, type=["null", "string"], format="date",
                       description="First day of labelled events to train on (default: all data)."),
        "end": Param(None, type=["null", "string"], format="date",
                     description="Last day (inclusive) of labelled events (default: newest partition)."),
        "trainer_overrides": Param({}, **TRAINER_OVERRIDES_SCHEMA,
                                   description='Trainer config overrides, e.g. {"optimizer.lr": 0.002, '
                                               '"train.epochs": 5} (keys: training_image/README.md).'),
        "min_test_roc_auc": Param(None, type=["null", "number"], minimum=0, maximum=1,
                                  description="Governance floor for test ROC AUC (default: CTRAIN_MIN_TEST_ROC_AUC)."),
    },
)
def continuous_training():
    @task
    @fail_fast
    def build_dataset() -> dict:
        from ctrain import pipeline

        params = get_current_context()["params"]
        return pipeline.build_dataset(get_settings(), start=params["start"], end=params["end"])

    @task
    @fail_fast
    def validate(snapshot: dict) -> dict:
        from ctrain import pipeline

        return pipeline.validate(get_settings(), snapshot)

    @task
    @fail_fast
    def materialize_online(snapshot: dict, validation: dict) -> dict:
        from ctrain import pipeline

        # validation is an input for ordering only: unvalidated features never reach serving.
        return pipeline.materialize_online(get_settings(), snapshot)

    @task(retries=2, retry_exponential_backoff=True)
    @fail_fast
    def train(snapshot: dict, validation: dict) -> dict:
        from ctrain import pipeline

        ctx = get_current_context()
        return pipeline.train(get_settings(), snapshot, validation, dag_id=ctx["dag"].dag_id,
                              dag_run_id=ctx["run_id"], overrides=ctx["params"]["trainer_overrides"],
                              sink=lambda line: print(line, flush=True))

    @task
    @fail_fast
    def evaluate(training: dict, snapshot: dict) -> dict:
        from ctrain import pipeline

        return pipeline.evaluate(get_settings(), training, snapshot)

    @task
    @fail_fast
    def register(training: dict, snapshot: dict, validation: dict, evaluation: dict) -> dict:
        from ctrain import pipeline

        # evaluation is an input only for ordering: a model that fails evaluation is never registered.
        return pipeline.register(get_settings(), training, snapshot, validation, get_current_context()["run_id"])

    @task
    @fail_fast
    def govern(evaluation: dict, registration: dict) -> dict:
        from ctrain import pipeline

        return pipeline.govern(get_settings(), evaluation, get_current_context()["params"]["min_test_roc_auc"])

    @task
    @fail_fast
    def promote(registration: dict, evaluation: dict, decision: dict) -> dict:
        from ctrain import pipeline

        return pipeline.promote(get_settings(), registration, evaluation, decision, get_current_context()["run_id"])

    snapshot = build_dataset()
    validation = validate(snapshot)
    training = train(snapshot, validation)
    materialize_online(snapshot, validation)
    evaluation = evaluate(training, snapshot)
    registration = register(training, snapshot, validation, evaluation)
    decision = govern(evaluation, registration)
    promote(registration, evaluation, decision)


continuous_training()
