"""
Generated from the pipeline definitions (`pipelines/*.yaml`): per pipeline `<name>`, one manual DAG
`model_rollback__<name>`.

**model_rollback__&lt;name&gt;**: makes `to` (Param: `previous`, or a version number) the champion of the
pipeline's registered model again, for `reason` (Param, required). It is the same move as the training
DAG's promotion and as `ctrain rollback`: under the model's promotion lock, compare-and-set on the champion,
recorded in the model's hash-chained audit log (action `rollback`, decided by `human:<triggering user>`)
before the aliases move. The champion it replaces becomes `previous`, so a second rollback undoes the first.
Any alias move done outside ctrain since the last record is recorded first (`external_move`, a warning).

Task code lives in `plugins/ctrain/registry.py`; this file is wiring only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from assets import DEFINITIONS
from ctrain.errors import fail_fast
from ctrain.settings import get_settings

if TYPE_CHECKING:
    from ctrain.definition import PipelineDefinition

START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")


def rollback_dag_id(definition: PipelineDefinition) -> str:
    return f"model_rollback__{definition.name}"


def model_rollback(definition: PipelineDefinition) -> None:
    name, dag_id = definition.name, rollback_dag_id(definition)

    @dag(
        dag_id=dag_id,
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        default_args={"owner": definition.owner, "retries": 1, "retry_delay": pendulum.duration(seconds=30)},
        doc_md=f"### {dag_id}\n\nRegistered model `{definition.model.name}`.\n{__doc__}",
        tags=["ctrain", "governance", "rollback", name],
        params={
            "to": Param("previous", type="string", pattern=r"^(previous|v?[0-9]+)$",
                        description="`previous`, or the version number to make champion."),
            "reason": Param(None, type="string", minLength=3,
                            description="Why: recorded in the audit log with who triggered the rollback."),
        },
    )
    def rollback_dag():
        @task
        @fail_fast
        def rollback() -> dict:
            from ctrain import pipeline

            ctx = get_current_context()
            user = getattr(ctx["dag_run"], "triggering_user_name", None)
            return pipeline.rollback(get_settings(pipeline=name), ctx["params"]["to"], ctx["params"]["reason"],
                                     decided_by=f"human:{user}" if user else "human:unknown",
                                     dag_run_id=ctx["run_id"])

        rollback()

    rollback_dag()


for _definition in DEFINITIONS.values():
    model_rollback(_definition)
