"""Bad input at the door: triggers sent through the REST API of a real Airflow API server.

The module starts ``airflow api-server`` on a free loopback port (SQLite metadata DB under a tmp home,
the DAGs serialized with ``airflow dags reserialize``, the simple auth manager with a generated password)
and posts ``conf`` to ``POST /api/v2/dags/continuous_training__fraud/dagRuns`` with a JWT from ``/auth/token``.
No scheduler runs, so an accepted trigger only queues a run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from support import airflow_cli, make_env

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.slow

DAG_ID = "continuous_training__fraud"
# A refusal is one rule and its fix, not a dump of the schema (it was ~24,000 characters).
MAX_BODY = 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, str]:
    """(status, body text) of one HTTP request; error statuses are returned, not raised."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except urllib.error.URLError as err:  # not listening (yet)
        return 0, str(err.reason)


class Api:
    def __init__(self, url: str, token: str, log: Path):
        self.url, self.token, self.log = url, token, log

    def trigger(self, conf: dict[str, Any]) -> tuple[int, str]:
        return request("POST", f"{self.url}/api/v2/dags/{DAG_ID}/dagRuns",
                       {"logical_date": None, "conf": conf}, self.token)


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[Api]:
    from ctrain.localenv import ensure_login
    from ctrain.settings import Settings

    home = tmp_path_factory.mktemp("trigger-api")
    port = free_port()
    env = make_env(home)
    env.update({"AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
                "AIRFLOW__API__WORKERS": "1"})
    for args in (["db", "migrate"], ["dags", "reserialize"]):
        done = airflow_cli(args, env, timeout=600)
        assert done.returncode == 0, f"airflow {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    user, password = ensure_login(Settings(home=home))
    log = home / "api-server.log"
    airflow = str(Path(sys.executable).with_name("airflow"))
    with log.open("w") as out:
        proc = subprocess.Popen([airflow, "api-server", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while request("GET", f"{url}/api/v2/monitor/health")[0] != 200:
            assert proc.poll() is None, f"api-server exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"api-server not up after 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        status, body = request("POST", f"{url}/auth/token", {"username": user, "password": password})
        assert status == 201, body
        yield Api(url, json.loads(body)["access_token"], log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def refused(api: Api, conf: dict[str, Any], *must_name: str) -> str:
    """Assert the trigger is refused with a short message naming each of ``must_name``; return it."""
    status, body = api.trigger(conf)
    assert status == 400, f"accepted ({status}): {conf}"
    assert len(body) < MAX_BODY, f"refusal body is {len(body)} characters:\n{body[:3000]}"
    detail = json.loads(body)["detail"]
    for word in must_name:
        assert word in detail, f"{word!r} not in the refusal:\n{detail}"
    return detail


def test_no_token_no_access(api):
    assert request("GET", f"{api.url}/api/v2/dags")[0] == 401
    status, body = request("GET", f"{api.url}/api/v2/dags", token=api.token)
    assert status == 200 and DAG_ID in body


def test_a_good_trigger_is_accepted(api):
    status, body = api.trigger({"trainer_overrides": {"train.epochs": 5, "model.factory": "trainer.model:mlp",
                                                      "model.kwargs": {"hidden_sizes": [32]}}})
    assert status == 200, body


def test_factory_outside_the_allow_list_is_refused(api):
    refused(api, {"trainer_overrides": {"model.factory": "os:system"}},
            "model.factory", "os:system", "CTRAIN_MODEL_FACTORY_PREFIXES", "trainer.model")
    # A module that merely starts with an allowed name is not under it.
    refused(api, {"trainer_overrides": {"model.factory": "trainer.modelx:build"}}, "model.factory")


@pytest.mark.parametrize("early_stopping", [True, False])
def test_epochs_above_the_ceiling_are_refused(api, early_stopping):
    refused(api, {"trainer_overrides": {"train.epochs": 1_000_000_000, "early_stopping.enabled": early_stopping}},
            "train.epochs", "1000000000", "CTRAIN_MAX_EPOCHS")


@pytest.mark.parametrize(("key", "value", "setting"), [
    ("train.max_steps", 10**12, "CTRAIN_MAX_STEPS"),
    ("train.batch_size", 10**9, "CTRAIN_MAX_BATCH_SIZE"),
    ("train.max_wall_clock_s", 10**9, "CTRAIN_MAX_TRAIN_WALL_CLOCK_S"),
])
def test_other_resource_ceilings_are_refused(api, key, value, setting):
    refused(api, {"trainer_overrides": {key: value}}, key, setting)


def test_unknown_key_is_one_short_line_naming_the_key_and_the_fix(api):
    detail = refused(api, {"trainer_overrides": {"optim.lr": 0.002}}, "optim.lr", "training_image/README.md")
    assert "properties" not in detail, detail  # no schema dump


def test_pipeline_owned_key_is_refused(api):
    refused(api, {"trainer_overrides": {"data.dataset_uri": "file:///elsewhere"}}, "data.dataset_uri")
