"""
### transactions_arrival

Data-arrival sensor: waits for a daily partition of labelled transactions newer than the last one
announced, then emits the `transactions` Asset event (with the partition dates in its extra), which
starts `continuous_training`. The announced high-water mark lives in the object store
(`{object_root}/state/transactions_announced.json`), so a rerun never announces the same day twice.

Land a new day by hand with `python -m ctrain.datagen --out .ctrain/data --append YYYY-MM-DD`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from assets import TRANSACTIONS
from ctrain.errors import fail_fast


@dag(
    dag_id="transactions_arrival",
    schedule="*/30 * * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": pendulum.duration(minutes=1)},
    doc_md=__doc__,
    tags=["ctrain", "sensor", "data-arrival"],
)
def transactions_arrival():
    # Not @fail_fast: with soft_fail an AirflowFailException would become a silent skip.
    @task.sensor(poke_interval=60, timeout=25 * 60, mode="reschedule", soft_fail=True)
    def new_partitions():
        from airflow.sdk import PokeReturnValue

        from ctrain.arrival import unannounced_partitions
        from ctrain.settings import get_settings

        days = unannounced_partitions(get_settings())
        return PokeReturnValue(is_done=bool(days), xcom_value=[d.isoformat() for d in days])

    @task(outlets=[TRANSACTIONS])
    @fail_fast
    def announce(days: list[str], *, outlet_events=None):
        from ctrain.arrival import mark_announced
        from ctrain.settings import get_settings

        outlet_events[TRANSACTIONS].extra = {"partitions": days}
        mark_announced(get_settings(), days)

    announce(new_partitions())


transactions_arrival()
