"""Fixtures shared by every test tier: an isolated ctrain home with Airflow pointed at it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent


def make_env(home: Path) -> dict[str, str]:
    """The process environment for a ctrain home: CTRAIN_* plus Airflow on SQLite under ``home``."""
    from ctrain.localenv import airflow_env
    from ctrain.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTRAIN_", "AIRFLOW", "MLFLOW_"))}
    env.update(airflow_env(Settings(home=home)))
    env["CTRAIN_HOME"] = str(home)
    return env


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    """Env for parsing DAGs (no DB needed); also applied to this process for in-process DagBag parsing."""
    env = make_env(tmp_path_factory.mktemp("ctrain-parse"))
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("CTRAIN_", "AIRFLOW"))})
    yield env
    os.environ.clear()
    os.environ.update(saved)


def airflow_cli(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    airflow = str(Path(sys.executable).with_name("airflow"))
    return subprocess.run([airflow, *args], env=env, capture_output=True, text=True, timeout=timeout)
