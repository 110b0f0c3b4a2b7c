"""Helpers for tests that run Airflow and the pipeline in an isolated ctrain home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def make_env(home: Path) -> dict[str, str]:
    """The process environment for a ctrain home: CTRAIN_* plus Airflow on SQLite under ``home``."""
    from ctrain.localenv import airflow_env
    from ctrain.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTRAIN_", "AIRFLOW", "MLFLOW_"))}
    env.update(airflow_env(Settings(home=home)))
    return env


def airflow_cli(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run this venv's Airflow CLI with ``env``; output captured."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    return subprocess.run([airflow, *args], env=env, capture_output=True, text=True, timeout=timeout)
