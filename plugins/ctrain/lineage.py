"""Lineage: the facts that tie a model version to its code, data, config and run."""

from __future__ import annotations

import hashlib
import subprocess

from ctrain.settings import PROJECT_ROOT


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


def config_fingerprint(config_bytes: bytes, overrides: dict[str, str]) -> str:
    """Hash of the trainer config file and its overrides, as the pipeline passes them."""
    h = hashlib.sha256(config_bytes)
    for key, value in sorted(overrides.items()):
        h.update(f"\0{key}={value}".encode())
    return h.hexdigest()[:16]


def run_key(dag_id: str, dataset_version: str, config_fingerprint: str) -> str:
    """Same DAG, data and config -> same key, so a retried or duplicated trigger resumes or no-ops."""
    return hashlib.sha256(f"{dag_id}\0{dataset_version}\0{config_fingerprint}".encode()).hexdigest()[:20]
