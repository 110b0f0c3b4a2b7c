"""`make up` (scripts/up.sh): the embedded stack listens on loopback only and asks for a login; it waits
until healthy or fails with the log's tail; scripts/down.sh stops all of it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from typing import TYPE_CHECKING

import psutil
import pytest
from test_trigger_api import free_port, request

if TYPE_CHECKING:
    from pathlib import Path

from ctrain.settings import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _env(home: Path, airflow_port: int, mlflow_port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTRAIN_", "AIRFLOW", "MLFLOW_"))}
    env.update({"CTRAIN_HOME": str(home), "CTRAIN_AIRFLOW_PORT": str(airflow_port),
                "CTRAIN_MLFLOW_PORT": str(mlflow_port), **extra})
    return env


def _script(name: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / name)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _group_pids(home: Path) -> set[int]:
    """Every live process of the groups up.sh recorded."""
    leaders = {int(p.read_text()) for p in (home / "pids").glob("*.pid")}
    return {p.pid for p in psutil.process_iter() if _pgid(p.pid) in leaders}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_up_listens_on_loopback_with_login_and_down_stops_it(tmp_path):
    home = tmp_path / "home"
    airflow_port, mlflow_port = free_port(), free_port()
    env = _env(home, airflow_port, mlflow_port)
    try:
        up = _script("up.sh", env)
        assert up.returncode == 0, up.stdout + up.stderr
        passwords = json.loads((home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
        assert f"user admin, password {passwords['admin']}" in up.stdout
        assert "CTRAIN_UI_HOST=0.0.0.0" in up.stdout  # how to open it up on purpose
        for log in (home / "logs").glob("*.log"):  # the password is shown to the user only
            assert passwords["admin"] not in log.read_text(), f"password in {log}"

        url = f"http://127.0.0.1:{airflow_port}"
        assert request("GET", f"{url}/api/v2/dags")[0] == 401
        status, body = request("POST", f"{url}/auth/token", {"username": "admin", "password": passwords["admin"]})
        assert status == 201, body
        status, body = request("GET", f"{url}/api/v2/dags", token=json.loads(body)["access_token"])
        assert status == 200 and "continuous_training__fraud" in body
        assert request("GET", f"http://127.0.0.1:{mlflow_port}/health")[0] == 200

        ours = _group_pids(home)
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in ours}
        assert {("127.0.0.1", airflow_port), ("127.0.0.1", mlflow_port)} <= listening
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, f"listening beyond loopback: {sorted(listening)}"
    finally:
        down = _script("down.sh", env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not list((home / "pids").glob("*.pid"))
    for port in (airflow_port, mlflow_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after down.sh"


def test_up_fails_with_the_logs_tail_when_a_component_cannot_start(tmp_path):
    home = tmp_path / "home"
    mlflow_port = free_port()
    with socket.socket() as taken:  # the Airflow port is held by someone else
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = _env(home, taken.getsockname()[1], mlflow_port, CTRAIN_UP_TIMEOUT_S="120")
        try:
            up = _script("up.sh", env)
        finally:
            _script("down.sh", env, timeout=120)
    assert up.returncode == 1, up.stdout + up.stderr
    assert "make up failed: airflow-api-server exited" in up.stderr, up.stderr[-3000:]
    assert "--- last lines of" in up.stderr
    assert "Airflow:" not in up.stdout  # no URLs printed for a stack that is not up
    assert not list((home / "pids").glob("*.pid"))
