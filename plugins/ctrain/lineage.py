"""Lineage: the facts that tie a model version to its code, data, config and run."""

from __future__ import annotations

import hashlib
import subprocess
from typing import TYPE_CHECKING

from ctrain.errors import ConfigError
from ctrain.settings import PROJECT_ROOT

if TYPE_CHECKING:
    from pathlib import Path


def git_sha() -> str:
    """The checkout's commit (with ``-dirty`` when it has local changes), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


# checkpoint.uri and output.uri are derived from the run key, which is derived from the config hash; both
# are fields outside the trainer's hash, so placeholders give the hash the real values give.
_UNHASHED_PLACEHOLDERS = ("checkpoint.uri=file:///run-key-not-yet-known", "output.uri=file:///run-key-not-yet-known")


def config_hash(config_path: Path, overrides: dict[str, str]) -> str:
    """The trainer's own semantic hash (``TrainerConfig.config_hash``) of ``config_path`` with the
    ``--set`` ``overrides`` the pipeline passes: the config loaded and validated by ``trainer.config``, so
    comments, key order, formatting and fields that do not change what is trained (locations, tracking,
    guardrails) leave it unchanged. ConfigError when the trainer would refuse the config."""
    from trainer.config import load_config
    from trainer.errors import ConfigError as TrainerConfigError

    sets = [f"{k}={v}" for k, v in sorted(overrides.items())]
    try:
        return load_config(config_path, [*sets, *_UNHASHED_PLACEHOLDERS]).config_hash()
    except TrainerConfigError as exc:
        raise ConfigError(f"trainer config refused: {exc}") from None


def run_key(dag_id: str, dataset_version: str, config_hash: str) -> str:
    """Same DAG, data and config -> same key, so a retried or duplicated trigger resumes or no-ops."""
    return hashlib.sha256(f"{dag_id}\0{dataset_version}\0{config_hash}".encode()).hexdigest()[:20]
