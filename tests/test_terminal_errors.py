"""Terminal errors fail the task at once; only retryable ones are retried. A bad window writes nothing.

``@fail_fast`` (ctrain.errors) is the one place that maps a terminal ctrain error to Airflow's
``AirflowFailException``; every DAG task wears it (tests/test_dag_integrity.py checks that).
"""

from __future__ import annotations

import re

import pytest
from airflow.sdk.exceptions import AirflowFailException

from ctrain import pipeline
from ctrain.errors import (
    ConfigError,
    DataError,
    ServiceUnavailable,
    TrainingFailed,
    ValidationFailed,
    fail_fast,
)
from ctrain_examples import fraud
from support import airflow_cli, make_env


def _raises(exc: BaseException):
    @fail_fast
    def task_body():
        raise exc

    return task_body


@pytest.mark.parametrize("exc", [
    ConfigError("start=2026-02-01 is after end=2026-01-01"),
    DataError("no transactions partitions"),
    ValidationFailed("v1", ["expect_column_values_to_not_be_null(amount)"], "file:///r.json"),
    TrainingFailed(65, "bad config"),
    TrainingFailed(70, "diverged"),
], ids=lambda e: type(e).__name__ + getattr(e, "exit_code", "").__str__())
def test_terminal_errors_fail_without_retry(exc):
    with pytest.raises(AirflowFailException, match=re.escape(str(exc).splitlines()[0])) as info:
        _raises(exc)()
    assert info.value.__cause__ is exc


@pytest.mark.parametrize("exc", [TrainingFailed(75, "lost peer"), TrainingFailed(-9, "killed"),
                                 ServiceUnavailable("MLflow not ready"), OSError("storage timeout")],
                         ids=lambda e: type(e).__name__)
def test_retryable_errors_propagate_for_airflow_to_retry(exc):
    with pytest.raises(type(exc)):
        _raises(exc)()


def _nothing_written(settings) -> None:
    home = settings.home
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and "data" not in p.parts)
    assert written == [], f"a refused window wrote {written}"


@pytest.fixture
def landed(dp_settings):
    fraud.generate(dp_settings.resolved_data_root, days=20, start="2026-01-01", rows_per_day=50, seed=0,
                     n_customers=50, n_merchants=10)
    return dp_settings


@pytest.mark.parametrize(("start", "end", "expected", "named"), [
    ("2026-01-15", "2026-01-05", ConfigError, "start=2026-01-15 is after end=2026-01-05"),
    ("2027-01-01", "2027-02-01", DataError, "data has landed for 2026-01-01..2026-01-20"),
    ("2026-01-01", "2026-01-10", ConfigError, "widen the window"),
])
def test_a_bad_window_is_refused_in_build_dataset_before_anything_is_written(landed, start, end, expected, named):
    with pytest.raises(expected, match=re.escape(named)):
        pipeline.build_dataset(landed, start=start, end=end)
    # ... and, as the task runs it, without a retry.
    with pytest.raises(AirflowFailException, match=re.escape(named)):
        fail_fast(pipeline.build_dataset)(landed, start=start, end=end)
    _nothing_written(landed)  # no feast registry, no snapshot


@pytest.mark.slow
def test_dag_run_with_start_after_end_fails_on_the_first_try(tmp_path):
    home = tmp_path / "home"
    env = make_env(home)
    fraud.generate(home / "data", days=20, start="2026-01-01", rows_per_day=50, seed=0)
    migrated = airflow_cli(["db", "migrate"], env)
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    run = airflow_cli(["dags", "test", "continuous_training__fraud", "-c",
                       '{"start": "2026-01-15", "end": "2026-01-05"}'], env, timeout=600)
    log = run.stdout + run.stderr
    (tmp_path / "dags-test.log").write_text(log)
    assert "start=2026-01-15 is after end=2026-01-05" in log, log[-4000:]
    assert "AirflowFailException" in log, log[-4000:]
    assert "up_for_retry" not in log.lower(), "a terminal error was retried"
    assert "[DAG TEST] end task task_id=validate" not in log
    written = sorted(str(p.relative_to(home)) for p in (home / "objects", home / "feast") if p.exists())
    assert written == [], f"a refused window wrote {written}"
