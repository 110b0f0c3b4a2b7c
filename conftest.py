"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

from support import make_env  # noqa: E402


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    """Env for parsing DAGs (no DB needed); also applied to this process for in-process DagBag parsing."""
    env = make_env(tmp_path_factory.mktemp("ctrain-parse"))
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("CTRAIN_", "AIRFLOW"))})
    yield env
    os.environ.clear()
    os.environ.update(saved)
