"""Fixtures for the trainer tests (helpers live in trainer_testkit, importable from test modules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from trainer_testkit import TrainerRun, write_snapshot

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture(scope="session")
def snapshot_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A binary-task snapshot shared by the tests that only read it."""
    return write_snapshot(tmp_path_factory.mktemp("snapshot") / "datasets" / "v1")


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory, snapshot_uri: str) -> TrainerRun:
    """One uninterrupted 2-process run of the debug config (the reference for several tests)."""
    run = TrainerRun(tmp_path_factory.mktemp("reference"), snapshot_uri)
    proc = run(nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


@pytest.fixture
def trainer_run(tmp_path: Path, snapshot_uri: str) -> TrainerRun:
    """Run the trainer against the shared snapshot, with MLflow, checkpoints and output in tmp_path."""
    return TrainerRun(tmp_path, snapshot_uri)
