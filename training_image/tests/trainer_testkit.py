"""Test helpers: a synthetic dataset snapshot in the contract format, and a trainer runner.

The snapshot has a learnable rule (label = 1 when a fixed linear score plus noise is high), so a tiny
model reaches a clearly-better-than-chance AUC in a couple of epochs.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import psutil
from mlflow import MlflowClient
from safetensors.torch import load_file

if TYPE_CHECKING:
    import torch

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS.parent / "configs"
FEATURES = ["amount_z", "tx_count_1h", "merchant_risk", "account_age_days"]


def write_snapshot(
    root: Path,
    rows: tuple[int, int, int] = (640, 256, 256),
    task: str = "binary",
    num_classes: int = 3,
    seed: int = 0,
) -> str:
    """Write train/val/test parquet + manifest.json (written last) under ``root``; return its file:// URI."""
    rng = np.random.default_rng(seed)
    weights = np.array([1.5, -1.0, 2.0, 0.5])
    root.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    start = 0
    for name, n in zip(("train", "val", "test"), rows, strict=True):
        x = rng.normal(size=(n, len(FEATURES))) * np.array([1.0, 3.0, 0.5, 100.0]) + np.array([0, 5, 0, 400])
        z = ((x - np.array([0, 5, 0, 400])) / np.array([1.0, 3.0, 0.5, 100.0])) @ weights
        noisy = z + rng.normal(scale=1.0, size=n)
        if task == "binary":
            label = (noisy > 1.5).astype(np.int64)
        elif task == "multiclass":
            label = np.digitize(noisy, np.quantile(z, np.linspace(0, 1, num_classes + 1)[1:-1])).astype(
                np.int64
            )
        else:
            label = (z + 0.1 * rng.normal(size=n)).astype(np.float64)
        frame = pd.DataFrame(x, columns=FEATURES)
        frame.insert(0, "transaction_id", np.arange(start, start + n, dtype=np.int64))
        frame.insert(1, "customer_id", rng.integers(0, 50, size=n))
        frame.insert(2, "merchant_id", rng.integers(0, 20, size=n))
        frame.insert(
            3,
            "event_timestamp",
            pd.Timestamp("2025-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="min"),
        )
        frame["label"] = label
        path = root / f"{name}.parquet"
        frame.to_parquet(path, index=False)
        splits[name] = {
            "file": f"{name}.parquet",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "rows": n,
            "label_rate": float(np.mean(label)) if task == "binary" else None,
            "start": str(frame["event_timestamp"].min()),
            "end": str(frame["event_timestamp"].max()),
        }
        start += n
    content = "".join(s["sha256"] for s in splits.values())
    manifest = {
        "dataset_version": hashlib.sha256(content.encode()).hexdigest()[:16],
        "feature_service": "fraud_model_v1",
        "feature_service_hash": "test",
        "feature_columns": FEATURES,
        "label_column": "label",
        "id_column": "transaction_id",
        "timestamp_column": "event_timestamp",
        "entity_columns": ["customer_id", "merchant_id"],
        "entity_window": {"start": "2025-01-01", "end": "2025-01-02"},
        "splits": splits,
        "source_partitions": ["date=2025-01-01"],
        "schema": {c: str(t) for c, t in frame.dtypes.items()},
        "created_at": "2025-01-02T00:00:00Z",
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return f"file://{root}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrainerRun:
    """One trainer invocation (torchrun when nproc > 1) against paths under a temp dir.

    The trainer processes import from this directory too (``model.factory=toy_models:...``);
    ``faults={...}`` runs them through the :mod:`fault_injection` entry point instead of ``trainer``.
    """

    def __init__(self, tmp: Path, dataset_uri: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.dataset_uri = dataset_uri
        self.tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
        self.checkpoint_uri = f"file://{tmp / 'checkpoints'}"
        self.output_uri = f"file://{tmp / 'output'}"

    def __call__(
        self,
        *overrides: str,
        nproc: int = 2,
        max_restarts: int = 0,
        config: str = "debug.yaml",
        env: dict[str, str] | None = None,
        timeout: float = 240,
        faults: dict[str, Any] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        base = [
            f"data.dataset_uri={self.dataset_uri}",
            f"checkpoint.uri={self.checkpoint_uri}",
            f"output.uri={self.output_uri}",
        ]
        entry = ["fault_injection", "--faults", json.dumps(faults)] if faults else ["trainer"]
        args = ["train", "--config", str(CONFIGS / config)]
        for item in [*base, *overrides]:
            args += ["--set", item]
        if nproc > 1:
            cmd = [
                sys.executable, "-m", "torch.distributed.run",
                f"--nproc-per-node={nproc}", "--nnodes=1", f"--max-restarts={max_restarts}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                "-m", *entry, *args,
            ]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", *entry, *args]
        full_env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "OMP_NUM_THREADS": "1",
            "GIT_PYTHON_REFRESH": "quiet",
            **(env or {}),
        }
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), full_env.get("PYTHONPATH")) if p)
        if "MLFLOW_RUN_ID" not in (env or {}):
            full_env.pop("MLFLOW_RUN_ID", None)
        with subprocess.Popen(
            cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.tmp
        ) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                # torchrun's workers run in sessions of their own: kill the whole tree we started.
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
                _, stderr = proc.communicate()
                raise AssertionError(f"trainer timed out after {timeout}s:\n{stderr[-4000:]}") from None
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)

    def result(self) -> dict[str, Any]:
        return json.loads((self.tmp / "output" / "result.json").read_text())

    def checkpoint_dir(self) -> Path:
        return self.tmp / "checkpoints"

    def weights(self) -> dict[str, torch.Tensor]:
        """The exported safetensors weights of the finished run."""
        run_id = self.result()["mlflow_run_id"]
        local = MlflowClient(self.tracking_uri).download_artifacts(
            run_id, "weights/model.safetensors", str(self.tmp)
        )
        return load_file(local)

    def runs(self, experiment: str = "ctrain-debug") -> list[Any]:
        client = MlflowClient(self.tracking_uri)
        found = client.get_experiment_by_name(experiment)
        return client.search_runs([found.experiment_id]) if found else []


def served_predictions(run: TrainerRun, snapshot_dir: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The test split and what the run's exported MLflow model predicts for it (as served)."""
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri)
    test = pd.read_parquet(snapshot_dir / "test.parquet")
    model = mlflow.pyfunc.load_model(run.result()["model_uri"])
    return test, np.asarray(model.predict(test[FEATURES]))
