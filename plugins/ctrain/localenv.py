"""The embedded-defaults environment: Airflow on SQLite and all state under ``.ctrain/``.

``python -m ctrain.localenv`` prints the environment as shell ``export`` lines (``make up`` and a user's
shell use it); :func:`airflow_env` gives the same to Python callers (the demo, the tests).
"""

from __future__ import annotations

import shlex
import sys

from ctrain.settings import PROJECT_ROOT, Settings, get_settings


def airflow_env(settings: Settings) -> dict[str, str]:
    """Env vars that point Airflow at this checkout's DAGs and a SQLite metadata DB under ``home``."""
    airflow_home = settings.home / "airflow"
    return {
        "CTRAIN_HOME": str(settings.home),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # The demo's Airflow is for one user on localhost; the production profile sets real auth.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "MLFLOW_TRACKING_URI": settings.resolved_tracking_uri,
    }


def main() -> None:
    for key, value in airflow_env(get_settings()).items():
        sys.stdout.write(f"export {key}={shlex.quote(value)}\n")


if __name__ == "__main__":
    main()
