"""The MLflow settings are honoured by every step that talks to MLflow: against a real ``mlflow server`` on
loopback, with only ``CTRAIN_MLFLOW_TRACKING_URI`` set (no ``MLFLOW_TRACKING_URI``), a trainer-exported
model is evaluated, registered, promoted and evaluated again as the champion, and no MLflow store
(``mlflow.db``, ``mlruns/``) appears in the working directory, the home directory or the ctrain home.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from typing import TYPE_CHECKING

import pytest

from support import free_port

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow

# What the trainer does at the end of a run (trainer.export.log_model into the pipeline's MLflow run),
# in its own process with MLFLOW_TRACKING_URI and MLFLOW_RUN_ID set as the launcher sets them.
_EXPORT = textwrap.dedent("""
    import sys

    import mlflow
    import numpy as np
    import torch

    from trainer.export import log_model
    from trainer.tasks import Task

    features = sys.argv[1].split(",")
    torch.manual_seed(0)
    with mlflow.start_run():
        uri = log_model(torch.nn.Sequential(torch.nn.Linear(len(features), 1)), Task("binary", None), features,
                        np.zeros((2, len(features)), np.float32))
    print("model_uri=" + uri)
""")


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = free_port()
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{server_dir / 'backend.db'}",
         "--artifacts-destination", str(server_dir / "artifacts"), "--serve-artifacts", "--workers", "1"],
        cwd=server_dir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start on {url}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_evaluate_register_promote_against_a_real_mlflow_server(mlflow_server: str, dp_snapshot, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrain import pipeline, registry
    from ctrain.settings import get_settings

    _, snapshot_info = dp_snapshot
    cwd, user_home, ctrain_home = tmp_path / "cwd", tmp_path / "user", tmp_path / "ctrain"
    for d in (cwd, user_home):
        d.mkdir()
    for key in [k for k in os.environ if k.startswith(("CTRAIN_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CTRAIN_MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("CTRAIN_HOME", str(ctrain_home))
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.chdir(cwd)
    settings = get_settings()
    assert settings.mlflow_tracking_uri == mlflow_server

    client = registry.get_client(settings)
    run = registry.training_run_for(client, settings, "server-test", tags={})
    features = snapshot_info.manifest["feature_columns"]
    exported = subprocess.run(
        [sys.executable, "-c", _EXPORT, ",".join(features)], capture_output=True, text=True, check=False,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_RUN_ID": run.run_id},
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    [model_uri] = [line.removeprefix("model_uri=") for line in exported.stdout.splitlines()
                   if line.startswith("model_uri=")]
    assert model_uri.startswith("models:/m-")
    client.set_terminated(run.run_id)

    training = {"model_uri": model_uri, "mlflow_run_id": run.run_id, "metrics": {}, "config_hash": "c",
                "seed": 0, "checkpoint": "none", "run_key": "server-test"}
    snapshot = {"uri": snapshot_info.uri, "dataset_version": snapshot_info.dataset_version,
                "feature_service": "fs", "feature_service_hash": "h", "source_partitions": "p"}
    first = pipeline.evaluate(settings, training, snapshot)
    primary = settings.definition.primary_test_metric
    assert 0.0 <= first["challenger"][primary] <= 1.0 and first["champion"] is None
    registration = pipeline.register(settings, training, snapshot, {"result_id": "r"}, "manual__server")
    decision = {"policy_version": "t", "metrics_compared": {}, "reasons": ["test"]}
    pipeline.promote(settings, registration, first, decision, "manual__server")
    again = pipeline.evaluate(settings, training, snapshot)
    assert again["champion_version"] == registration["version"]
    assert again["champion"][primary] == pytest.approx(first["challenger"][primary])
    assert client.get_run(run.run_id).data.metrics[f"eval_{primary}"] == pytest.approx(first["challenger"][primary])

    strays = [p for d in (cwd, user_home, ctrain_home) for p in d.rglob("*") if p.name in ("mlflow.db", "mlruns")]
    assert not strays, f"an MLflow store outside the server: {strays}"
