"""
Generated from the pipeline definitions (`pipelines/*.yaml`): per pipeline `<name>`, one training DAG
`continuous_training__<name>` and one data-arrival DAG `<events table>_arrival__<name>`.

**continuous_training__&lt;name&gt;**: features from the definition's Feast feature service -> Great
Expectations gate (the definition's thresholds) -> DDP training (torchrun) -> evaluation on the
definition's metrics -> MLflow registry -> governance (the pipeline's policy file: floors, non-inferiority
with intervals, slices, lineage, size, latency) -> human approval when the policy asks for one (Airflow's
HITL approval, assigned to the definition's approvers; no answer in time rejects) -> promotion ->
retirement of versions older than the newest `governance.keep_versions` (never an alias holder); validated
features are also materialized to the online store. Runs on the definition's cron **or** as soon as one of
its Assets has an event, and from the UI with the Params below.
Re-running for the same data and config resumes or reuses the earlier training (run key = dag, dataset
version, config): it never trains or registers twice.

**&lt;table&gt;_arrival__&lt;name&gt;**: waits for a daily partition of the events table newer than the last
one announced for this pipeline, then emits the table's Asset (the partition dates in its extra). The
high-water mark lives in the object store, so a rerun never announces the same day twice.

Task code lives in `plugins/ctrain/pipeline.py`, `plugins/ctrain/approval.py` and `plugins/ctrain/arrival.py`;
this file is wiring only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pendulum
from airflow.sdk import (
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    TriggerRule,
    dag,
    get_current_context,
    task,
)

from assets import ASSETS, DEFINITIONS
from ctrain.approval import ApprovalTask
from ctrain.errors import fail_fast
from ctrain.params import trainer_overrides_schema
from ctrain.settings import get_settings

if TYPE_CHECKING:
    from ctrain.definition import PipelineDefinition

# Generated from the trainer's config models (`python -m trainer overrides-schema`; a test keeps it
# current) and narrowed by the operator's settings (factory allow-list, ceilings; env vars only): a
# trigger with an unknown key, a bad value or one beyond a limit is refused before anything runs.
TRAINER_OVERRIDES_SCHEMA = trainer_overrides_schema(
    json.loads((Path(__file__).parent / "trainer_overrides.schema.json").read_text()), get_settings()
)
START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")


def _schedule(definition: PipelineDefinition):
    """The definition's cron, its Assets, or either of the two."""
    cron = definition.schedule.cron
    assets = [ASSETS[name] for name in definition.schedule.assets]
    timetable = CronTriggerTimetable(cron, timezone="UTC") if cron else None
    if timetable and assets:
        return AssetOrTimeSchedule(timetable=timetable, assets=assets)
    return timetable or assets or None


def _doc(definition: PipelineDefinition, dag_id: str) -> str:
    return f"### {dag_id}\n\n{definition.description}\n\nDefinition: `pipelines/{definition.name}.yaml`.\n{__doc__}"


def continuous_training(definition: PipelineDefinition) -> None:
    name = definition.name

    # Every task wears @fail_fast: a terminal error (bad Param, bad data, a failed gate) fails at once,
    # only retryable ones (lost peer, storage, MLflow unavailable) spend these retries.
    @dag(
        dag_id=definition.dag_id,
        schedule=_schedule(definition),
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        default_args={"owner": definition.owner, "retries": 1, "retry_delay": pendulum.duration(seconds=30)},
        doc_md=_doc(definition, definition.dag_id),
        tags=["ctrain", "training", name],
        params={
            "start": Param(None, type=["null", "string"], format="date",
                           description="First day of labelled events to train on (default: all data)."),
            "end": Param(None, type=["null", "string"], format="date",
                         description="Last day (inclusive) of labelled events (default: newest partition)."),
            "trainer_overrides": Param({}, **TRAINER_OVERRIDES_SCHEMA,
                                       description='Trainer config overrides, e.g. {"optimizer.lr": 0.002, '
                                                   '"train.epochs": 5} (keys: training_image/README.md).'),
            "primary_metric_floor": Param(
                None, type=["null", "number"],
                description=f"Governance floor for {definition.primary_test_metric} "
                            f"({definition.metrics.direction} is better; default: floors."
                            f"{definition.metrics.primary} of its policy file {definition.governance.policy})."),
        },
    )
    def training():
        @task
        @fail_fast
        def build_dataset() -> dict:
            from ctrain import pipeline

            params = get_current_context()["params"]
            return pipeline.build_dataset(get_settings(pipeline=name), start=params["start"], end=params["end"])

        @task
        @fail_fast
        def validate(snapshot: dict) -> dict:
            from ctrain import pipeline

            return pipeline.validate(get_settings(pipeline=name), snapshot)

        @task
        @fail_fast
        def materialize_online(snapshot: dict, validation: dict) -> dict:
            from ctrain import pipeline

            # validation is an input for ordering only: unvalidated features never reach serving.
            return pipeline.materialize_online(get_settings(pipeline=name), snapshot)

        @task(retries=2, retry_exponential_backoff=True)
        @fail_fast
        def train(snapshot: dict, validation: dict) -> dict:
            from ctrain import pipeline

            ctx = get_current_context()
            return pipeline.train(get_settings(pipeline=name), snapshot, validation, dag_id=ctx["dag"].dag_id,
                                  dag_run_id=ctx["run_id"], overrides=ctx["params"]["trainer_overrides"],
                                  sink=lambda line: print(line, flush=True))

        @task
        @fail_fast
        def evaluate(training: dict, snapshot: dict) -> dict:
            from ctrain import pipeline

            return pipeline.evaluate(get_settings(pipeline=name), training, snapshot)

        @task
        @fail_fast
        def register(training: dict, snapshot: dict, validation: dict, evaluation: dict) -> dict:
            from ctrain import pipeline

            # evaluation is an input only for ordering: a model that fails evaluation is never registered.
            return pipeline.register(get_settings(pipeline=name), training, snapshot, validation,
                                     get_current_context()["run_id"])

        @task
        @fail_fast
        def govern(evaluation: dict, registration: dict) -> dict:
            from ctrain import pipeline

            ctx = get_current_context()
            return pipeline.govern(get_settings(pipeline=name), evaluation,
                                   primary_metric_floor=ctx["params"]["primary_metric_floor"], dag_run_id=ctx["run_id"])

        # Runs after an approval or when none was required (approve skipped); a rejection, a timeout or a
        # failure upstream fails approve or an earlier task, and then promote never runs.
        @task(trigger_rule=TriggerRule.NONE_FAILED)
        @fail_fast
        def promote(registration: dict, evaluation: dict, decision: dict) -> dict:
            from ctrain import pipeline

            return pipeline.promote(get_settings(pipeline=name), registration, evaluation, decision,
                                    get_current_context()["run_id"])

        @task
        @fail_fast
        def retire(promotion: dict) -> dict:
            from ctrain import pipeline

            # promotion is an input for ordering only: retirement never races the promotion it follows.
            return pipeline.retire(get_settings(pipeline=name), promotion, get_current_context()["run_id"])

        snapshot = build_dataset()
        validation = validate(snapshot)
        training = train(snapshot, validation)
        materialize_online(snapshot, validation)
        evaluation = evaluate(training, snapshot)
        registration = register(training, snapshot, validation, evaluation)
        decision = govern(evaluation, registration)
        approve = ApprovalTask(task_id="approve", pipeline=name)
        promoted = promote(registration, evaluation, decision)
        decision >> approve >> promoted
        retire(promoted)

    training()


def arrival(definition: PipelineDefinition) -> None:
    name, landed = definition.name, ASSETS[definition.events.table]

    @dag(
        dag_id=definition.arrival_dag_id,
        schedule="*/30 * * * *",
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        default_args={"owner": definition.owner, "retries": 2, "retry_delay": pendulum.duration(minutes=1)},
        doc_md=_doc(definition, definition.arrival_dag_id),
        tags=["ctrain", "sensor", "data-arrival", name],
    )
    def sensor():
        # Not @fail_fast: with soft_fail an AirflowFailException would become a silent skip.
        @task.sensor(poke_interval=60, timeout=25 * 60, mode="reschedule", soft_fail=True)
        def new_partitions():
            from airflow.sdk import PokeReturnValue

            from ctrain.arrival import unannounced_partitions

            days = unannounced_partitions(get_settings(pipeline=name))
            return PokeReturnValue(is_done=bool(days), xcom_value=[d.isoformat() for d in days])

        @task(outlets=[landed])
        @fail_fast
        def announce(days: list[str], *, outlet_events=None):
            from ctrain.arrival import mark_announced

            outlet_events[landed].extra = {"partitions": days}
            mark_announced(get_settings(pipeline=name), days)

        announce(new_partitions())

    sensor()


for _definition in DEFINITIONS.values():
    continuous_training(_definition)
    arrival(_definition)
