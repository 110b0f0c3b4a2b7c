"""Who may move aliases, on a real ``mlflow server --app-name basic-auth`` (SQLite backend and users DB):
``python -m ctrain.mlflow_auth config`` writes its auth config, ``setup`` creates the pipeline's service
account (MANAGE on every pipeline's registered model and experiment) and a READ person. The service account
runs the pipeline's registry code (a training run, a model version, the champion move); the READ person
is refused (403 PERMISSION_DENIED) moving an alias and nothing changes. No password reaches argv or output.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from typing import TYPE_CHECKING

import pytest
from test_approval_airflow import port_in_range
from test_mlflow_server import _EXPORT

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow

ADMIN_PASSWORD = "ctrain-test-admin-5d1f0e"
SERVICE, SERVICE_PASSWORD = "ctrain-pipeline", "ctrain-test-service-a83c"
PERSON, PERSON_PASSWORD = "alice", "ctrain-test-alice-77b2"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTRAIN_", "MLFLOW_", "AWS_"))}
    return {**env, **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mlflow-auth")
    config = root / "basic_auth.ini"
    done = subprocess.run([sys.executable, "-m", "ctrain.mlflow_auth", "config", str(config)],
                          capture_output=True, text=True, env=_clean_env(), check=False)
    assert done.returncode == 0, done.stderr
    assert (config.stat().st_mode & 0o777) == 0o600 and "default_permission = READ" in config.read_text()
    port = port_in_range()
    env = _clean_env(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_USERNAME="admin",
                     MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
             "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'backend.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts", "--workers", "1"],
            cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, f"no server:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def set_up(server: str, tmp_path_factory) -> tuple[str, Path]:
    """``python -m ctrain.mlflow_auth setup`` run twice (idempotent), as the deployment would."""
    home = tmp_path_factory.mktemp("auth-home")
    people = home / "people.json"
    people.write_text(json.dumps({PERSON: PERSON_PASSWORD}))
    people.chmod(0o600)
    env = _clean_env(CTRAIN_MLFLOW_TRACKING_URI=server, CTRAIN_HOME=str(home),
                     CTRAIN_MLFLOW_READ_USERS_FILE=str(people), MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
                     MLFLOW_TRACKING_USERNAME=SERVICE, MLFLOW_TRACKING_PASSWORD=SERVICE_PASSWORD)
    outputs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "ctrain.mlflow_auth", "setup"], capture_output=True,
                              text=True, env=env, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout + done.stderr)
    assert f"{SERVICE}: MANAGE on registered model fraud_detector" in outputs[0]
    assert f"{PERSON}: READ on registered model fraud_detector" in outputs[0]
    assert f"created users: {PERSON}, {SERVICE}" in outputs[0] or f"created users: {SERVICE}, {PERSON}" in outputs[0]
    assert "created users: none (all existed)" in outputs[1]
    for text in outputs:
        assert not {ADMIN_PASSWORD, SERVICE_PASSWORD, PERSON_PASSWORD} & set(text.split()), text
        assert all(p not in text for p in (ADMIN_PASSWORD, SERVICE_PASSWORD, PERSON_PASSWORD))
    return server, home


def _as(monkeypatch: pytest.MonkeyPatch, server: str, home: Path, user: str, password: str):
    from ctrain.settings import get_settings

    for key in [k for k in os.environ if k.startswith(("CTRAIN_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CTRAIN_MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("CTRAIN_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return get_settings(pipeline="fraud")


def test_service_account_runs_the_registry_and_a_reader_cannot_move_an_alias(set_up, monkeypatch, tmp_path):
    from mlflow.exceptions import MlflowException

    from ctrain import registry

    server, home = set_up
    settings = _as(monkeypatch, server, home, SERVICE, SERVICE_PASSWORD)
    client = registry.get_client(settings)
    run = registry.training_run_for(client, settings, "auth-test", tags={})
    features = ["amount", "x1"]
    exported = subprocess.run(
        [sys.executable, "-c", _EXPORT, ",".join(features)], capture_output=True, text=True, check=False,
        env={**os.environ, "MLFLOW_TRACKING_URI": server, "MLFLOW_RUN_ID": run.run_id}, cwd=tmp_path,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    [model_uri] = [line.removeprefix("model_uri=") for line in exported.stdout.splitlines()
                   if line.startswith("model_uri=")]
    client.set_terminated(run.run_id)
    version = registry.register_challenger(client, settings, run.run_id, model_uri, {"dataset_version": "d"})
    record = registry.AuditRecord(model=settings.model_name, version=version, action="promote",
                                  decided_by="policy:test", policy_version="test", previous_champion=None,
                                  metrics_compared={}, reasons=["test"], dag_run_id="manual__auth", at=time.time())
    registry.promote(client, settings, version, None, record)
    assert registry.alias_version(client, settings.model_name, registry.CHAMPION) == version

    reader = _as(monkeypatch, server, home, PERSON, PERSON_PASSWORD)
    as_reader = registry.get_client(reader)
    assert registry.alias_version(as_reader, reader.model_name, registry.CHAMPION) == version  # may read
    for move in (lambda: as_reader.set_registered_model_alias(reader.model_name, registry.CHAMPION, version),
                 lambda: as_reader.set_registered_model_alias(reader.model_name, registry.PREVIOUS, version),
                 lambda: as_reader.delete_registered_model_alias(reader.model_name, registry.CHAMPION)):
        with pytest.raises(MlflowException) as refused:
            move()
        assert refused.value.error_code == "PERMISSION_DENIED", refused.value
        assert refused.value.get_http_status_code() == 403
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
        as_reader.set_model_version_tag(reader.model_name, version, "promoted_by", "alice")
    after = registry.get_client(_as(monkeypatch, server, home, SERVICE, SERVICE_PASSWORD))
    model = after.get_registered_model(settings.model_name)
    assert model.aliases == {registry.CHALLENGER: version, registry.CHAMPION: version}, model.aliases
    assert after.get_model_version(settings.model_name, version).tags["promoted_by"] == "policy:test"


def test_a_wrong_password_is_refused(set_up, monkeypatch):
    from mlflow.exceptions import MlflowException

    from ctrain import registry

    server, home = set_up
    settings = _as(monkeypatch, server, home, SERVICE, "not-the-password")
    with pytest.raises(MlflowException) as refused:
        registry.get_client(settings).get_registered_model(settings.model_name)
    assert refused.value.get_http_status_code() == 401
