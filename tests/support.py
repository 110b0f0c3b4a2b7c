"""Helpers for tests that run Airflow and the pipeline in an isolated ctrain home."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

# A tiny world: 6 days x 300 labelled events, enough for a 4/1/1-day split and a meaningful GX run.
DP_DAYS = 6
DP_START = "2026-01-01"
DP_ROWS_PER_DAY = 300


def make_env(home: Path) -> dict[str, str]:
    """The process environment for a ctrain home: CTRAIN_* plus Airflow on SQLite under ``home``."""
    from ctrain.localenv import airflow_env
    from ctrain.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTRAIN_", "AIRFLOW", "MLFLOW_"))}
    env.update(airflow_env(Settings(home=home)))
    return env


def pipeline_settings(home: Path, name: str = "fraud", pipelines: Path | None = None, **changes: object):
    """Settings whose pipelines directory (``pipelines``, default under ``home``) holds a copy of ``pipelines/<name>.yaml`` with
    ``changes`` applied: ``model__name="m1"`` sets ``model.name`` (a definition is data; tests vary it)."""
    import yaml

    from ctrain.settings import PROJECT_ROOT, Settings

    tree = yaml.safe_load((PROJECT_ROOT / "pipelines" / f"{name}.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = str(value) if isinstance(value, Path) else value
    pipelines = pipelines or home / "pipelines"
    pipelines.mkdir(parents=True, exist_ok=True)
    (pipelines / f"{name}.yaml").write_text(yaml.safe_dump(tree))
    policy = pipelines / tree["governance"]["policy"]  # the policy file, relative to the definition
    if not policy.exists():
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_bytes((PROJECT_ROOT / "pipelines" / tree["governance"]["policy"]).read_bytes())
    return Settings(home=home, pipelines_dir=pipelines, pipeline=name)


def airflow_cli(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run this venv's Airflow CLI with ``env``; output captured."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    return subprocess.run([airflow, *args], env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_s3(monkeypatch, env: dict[str, str], bucket: str):
    """A moto S3 server on loopback with ``bucket`` created; yields its endpoint URL.

    The environment is this test's alone: every ``CTRAIN_*``, ``MLFLOW_*`` and ``AWS_*`` variable is
    removed, then ``env`` is set with ``CTRAIN_S3_ENDPOINT_URL`` at the server (never ``AWS_ENDPOINT_URL``:
    ctrain must find the endpoint from its settings). On exit moto is reset (its backends are this process's
    globals, shared by every server it starts) and stopped."""
    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for key in [k for k in os.environ if k.startswith(("CTRAIN_", "MLFLOW_", "AWS_"))]:
            monkeypatch.delenv(key)
        for key, value in {"AWS_DEFAULT_REGION": "us-east-1", **env, "CTRAIN_S3_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        requests.post(f"{endpoint}/moto-api/reset", timeout=30)
        server.stop()


# Every credential a deployment hands ctrain, each set to a value that must never be written anywhere. (The
# MLflow user name is not one: MLflow records it as the run's user, on purpose.)
CANARIES = {
    "AWS_ACCESS_KEY_ID": "AKIACTRAINCANARY0001",
    "AWS_SECRET_ACCESS_KEY": "ctrain-canary-aws-secret-7f3a9b",
    "AWS_SESSION_TOKEN": "ctrain-canary-aws-session-c41d",
    "MLFLOW_TRACKING_PASSWORD": "ctrain-canary-mlflow-password-92e1",
    "MLFLOW_TRACKING_TOKEN": "ctrain-canary-mlflow-token-5b7c",
}


def leaks(blobs) -> list[str]:
    """``where: VAR`` for every canary value found in any ``(where, bytes)`` pair."""
    found = []
    for where, blob in blobs:
        found += [f"{where}: {name}" for name, value in CANARIES.items() if value.encode() in blob]
    return found


def files_under(root: Path):
    """``(relative path, bytes)`` of every file under ``root``."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        yield str(path.relative_to(root)), path.read_bytes()


def mlflow_records(tracking_uri: str):
    """``(what, bytes)`` of every param, tag and artifact of every run, model version and logged model."""
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiment_ids):
        yield f"run {run.info.run_id} params", repr(run.data.params).encode()
        yield f"run {run.info.run_id} tags", repr(run.data.tags).encode()
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(client.download_artifacts(run.info.run_id, "", tmp))
            for name, blob in files_under(local):
                yield f"run {run.info.run_id} artifact {name}", blob
    for version in client.search_model_versions():
        yield f"model version {version.name} v{version.version} tags", repr(version.tags).encode()
    for model in client.search_logged_models(experiment_ids):
        yield f"logged model {model.model_id}", repr((model.params, model.tags)).encode()


def registered_versions(client, settings, count: int, start: int = 0) -> list[str]:
    """``count`` new versions of the settings' model, each from its own finished run with an (empty) logged
    model, registered through :func:`ctrain.registry.register_challenger` as the pipeline does. The registry
    never opens the model, so an empty logged model stands in for a trained network."""
    from ctrain import registry

    versions = []
    for i in range(start, start + count):
        run = registry.training_run_for(client, settings, f"{settings.model_name}-key-{i}", tags={})
        experiment_id = client.get_run(run.run_id).info.experiment_id
        model = client.create_logged_model(experiment_id, name="model", source_run_id=run.run_id)
        client.finalize_logged_model(model.model_id, "READY")
        client.set_terminated(run.run_id)
        versions.append(registry.register_challenger(client, settings, run.run_id, f"models:/{model.model_id}",
                                                     {"dag_run_id": f"run-{i}"}))
    return versions
