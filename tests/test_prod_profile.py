"""The production profile end to end on real services: ``scripts/prod.sh up`` (what ``make up PROFILE=prod``
runs) on this machine's Postgres and Redis, then ``continuous_training__fraud`` triggered through the REST
API with a JWT, its train task in the training container (docker launcher, host network).

The stack (one per module, shared by both cases): the Airflow api-server, scheduler (LocalExecutor),
dag-processor and triggerer on Postgres; ``mlflow server --app-name basic-auth`` on Postgres (its auth DB
too) with artifacts proxied to S3; Feast's SQL registry on Postgres and its Redis online store; a moto S3
server on loopback holding the object root. Databases are this module's own (``ctrain_prod_t<hex>_*``,
dropped after); Redis is DB 11 (``CTRAIN_TEST_REDIS_DB`` moves it) and the Feast keys are deleted after.

1. A run succeeds: snapshot, checkpoints, validation reports, the audit record and the model's
   artifacts are in the bucket; one MLflow run for the run key; the champion alias points at its
   version; an online read from Redis equals the newest offline value for an entity; no secret in any
   task log, any process's argv or the script's output.
2. The training container is killed (``docker kill``) once a checkpoint of the run is in S3: Airflow
   retries the train task (the dead container's lease may refuse the first retry with exit 75), the
   retry resumes from the S3 checkpoint at a step > 0, the run succeeds, with still one MLflow run and
   one model version for the run key.

The test's pipeline definition is a copy of ``pipelines/fraud.yaml`` whose policy requires GX success and
complete lineage only (no floors, no comparison with the champion), so case 2's model is promoted
whatever its AUC against case 1's, and with no schedule (unpausing the DAG for the trigger would otherwise also start
the newest missed cron interval ahead of it); both triggers set ``primary_metric_floor`` 0 (tiny data). The train task's retry
delay is the DAG's own (30 s, exponential).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
import yaml
from test_trigger_api import request

from support import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

# One DAG run on real backends takes 5-10 minutes on 2 shared cores; the first test also starts the stack.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "continuous_training__fraud"
MODEL = "fraud_detector"
RUN_TIMEOUT_S = 900


def _port() -> int:
    """A free loopback port in 18000-18999 (the range this machine's tests may use)."""
    import socket

    for _ in range(200):
        port = 18000 + int.from_bytes(os.urandom(2), "big") % 1000
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return port
    return free_port()


class Stack:
    """The running profile: its environment, URLs, secrets and a JWT for the REST API."""

    def __init__(self, home: Path, env: dict[str, str], up_output: str):
        self.home, self.env, self.up_output = home, env, up_output
        exported = subprocess.run(["bash", str(ROOT / "scripts" / "prod.sh"), "env"], env=env, text=True,
                                  capture_output=True, check=True).stdout
        self.values = _shell_values(exported)
        self.secrets = _shell_values((home / "prod" / "secrets.env").read_text())
        self.airflow = self.values["airflow_url"]
        passwords = json.loads((home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
        self.ui_password = passwords["admin"]
        status, body = request("POST", f"{self.airflow}/auth/token", {"username": "admin",
                                                                      "password": self.ui_password})
        assert status == 201, body
        self.token = json.loads(body)["access_token"]

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, text = request(method, f"{self.airflow}/api/v2{path}", body, self.token)
        assert 200 <= status < 300, f"{method} {path}: {status} {text[:2000]}"
        return json.loads(text) if text else None

    def trigger(self, conf: dict[str, Any]) -> str:
        return self.api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def wait(self, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{_quote(run_id)}")["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(5)
        raise AssertionError(f"{run_id} not finished after {timeout_s} s: {self.task_states(run_id)}")

    def task_states(self, run_id: str) -> dict[str, tuple[str, int]]:
        tis = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{_quote(run_id)}/taskInstances")["task_instances"]
        return {t["task_id"]: (t["state"], t["try_number"]) for t in tis}

    def task_log(self, run_id: str, task_id: str, try_number: int) -> str:
        """The task log as the API serves it (the files the task wrote)."""
        status, text = request("GET", f"{self.airflow}/api/v2/dags/{DAG_ID}/dagRuns/{_quote(run_id)}/taskInstances/"
                               f"{task_id}/logs/{try_number}?full_content=true", token=self.token)
        assert status == 200, text[:2000]
        return text

    def s3_keys(self) -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.values["s3_url"], region_name="us-east-1",
                          aws_access_key_id=self.secrets["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=self.secrets["AWS_SECRET_ACCESS_KEY"])
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.values["bucket"])
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def mlflow(self):
        """A client logged in to the profile's MLflow (basic auth: the credentials by environment, as
        MLflow reads them; the fixture removes them again)."""
        from mlflow import MlflowClient

        from ctrain import prodenv

        os.environ["MLFLOW_TRACKING_USERNAME"] = prodenv.SERVICE_USER
        os.environ["MLFLOW_TRACKING_PASSWORD"] = self.secrets["MLFLOW_TRACKING_PASSWORD"]
        uri = self.values["mlflow_url"]
        return MlflowClient(uri, registry_uri=uri)


def _quote(run_id: str) -> str:
    from urllib.parse import quote

    return quote(run_id, safe="")


def _shell_values(text: str) -> dict[str, str]:
    import shlex

    values = {}
    for line in text.splitlines():
        key, sep, value = line.removeprefix("export ").partition("=")
        if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            values[key] = shlex.split(value)[0] if value else ""
    return values


def _docker_env() -> dict[str, str]:
    """DOCKER_HOST of the project's engine (scripts/images.sh env), the training image as set or latest."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "images.sh"), "env"], cwd=ROOT, text=True,
                         capture_output=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"scripts/images.sh env failed: {out.stderr[-1500:]}")
    env = _shell_values(out.stdout)
    return {"DOCKER_HOST": env["DOCKER_HOST"],
            "CTRAIN_TRAINING_IMAGE": os.environ.get("CTRAIN_TRAINING_IMAGE", env["CTRAIN_TRAINING_IMAGE"])}


@pytest.fixture(scope="module")
def stack(request) -> Iterator[Stack]:
    import shutil
    import tempfile

    import docker

    from ctrain_examples import fraud

    # Not under pytest's basetemp: another pytest session on the machine prunes old basetemps, and the
    # stack's pid files must outlive them until it is stopped.
    home = Path(tempfile.mkdtemp(prefix="ctrain-prod-")) / "home"
    pipelines = home / "pipelines"
    pipelines.mkdir(parents=True)
    definition = yaml.safe_load((ROOT / "pipelines" / "fraud.yaml").read_text())
    # triggered runs only: unpausing a cron DAG would start the newest missed interval ahead of the trigger
    definition["schedule"] = {"cron": None, "assets": []}
    definition["training"]["config"] = str(ROOT / definition["training"]["config"])
    (pipelines / "fraud.yaml").write_text(yaml.safe_dump(definition))
    # A policy of GX success and complete lineage only (the defaults; the image by its content id): no
    # floors, no comparison with the champion, so case 2's model is promoted whatever its AUC vs case 1's.
    (pipelines / definition["governance"]["policy"]).parent.mkdir(parents=True)
    (pipelines / definition["governance"]["policy"]).write_text("version: prod-test\n")
    fraud.generate(home / "data", days=20, start="2026-01-01", rows_per_day=400, seed=0)

    docker_env = _docker_env()
    try:
        client = docker.DockerClient(base_url=docker_env["DOCKER_HOST"])
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine at {docker_env['DOCKER_HOST']} ({exc}): start one with make images "
                    "(CTRAIN_IMAGES_DOCKER_STATE names its state directory)")
    if not client.images.list(docker_env["CTRAIN_TRAINING_IMAGE"]):
        pytest.fail(f"training image {docker_env['CTRAIN_TRAINING_IMAGE']} is not on the engine: make images")
    prefix = f"ctrain_prod_t{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTRAIN_", "AIRFLOW", "MLFLOW_", "AWS_"))}
    env.update(docker_env)
    env.update({"CTRAIN_HOME": str(home), "CTRAIN_PIPELINES_DIR": str(pipelines),
                "CTRAIN_AIRFLOW_PORT": str(_port()), "CTRAIN_MLFLOW_PORT": str(_port()),
                "CTRAIN_PROD_S3_PORT": str(_port()), "CTRAIN_PROD_DB_PREFIX": prefix,
                "CTRAIN_PROD_REDIS": f"127.0.0.1:6379,db={os.environ.get('CTRAIN_TEST_REDIS_DB', '11')}",
                "CTRAIN_DOCKER_NAME_PREFIX": f"ctrain-prod-{prefix[-8:]}-", "CTRAIN_UP_TIMEOUT_S": "600"})
    script = str(ROOT / "scripts" / "prod.sh")
    started = time.monotonic()
    try:
        up = subprocess.run(["bash", script, "up"], env=env, text=True, capture_output=True, timeout=900)
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"scripts/prod.sh up: {time.monotonic() - started:.0f} s")
        yield Stack(home, env, up.stdout + up.stderr)
    finally:
        down = subprocess.run(["bash", script, "purge"], env=env, text=True, capture_output=True, timeout=300)
        print(down.stdout, down.stderr)
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key, None)
        for container in client.containers.list(all=True, filters={"name": env["CTRAIN_DOCKER_NAME_PREFIX"]}):
            container.remove(force=True)
        client.close()
        if request.session.testsfailed:
            print(f"kept {home} (logs under prod/logs and airflow/logs)")
        else:
            shutil.rmtree(home.parent, ignore_errors=True)


def _runs_for(client, run_key: str) -> list:
    experiment = client.get_experiment_by_name(MODEL)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`ctrain.run_key` = '{run_key}'")


def _results(stack: Stack) -> dict[str, dict[str, Any]]:
    """run key -> the trainer's result.json, read from the bucket."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.values["s3_url"], region_name="us-east-1",
                      aws_access_key_id=stack.secrets["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack.secrets["AWS_SECRET_ACCESS_KEY"])
    keys = [k for k in stack.s3_keys() if re.fullmatch(r"objects/runs/[^/]+/result\.json", k)]
    return {k.split("/")[2]: json.loads(s3.get_object(Bucket=stack.values["bucket"], Key=k)["Body"].read())
            for k in keys}


def _assert_no_secret(stack: Stack, run_id: str, tries: dict[str, int]) -> None:
    """No secret value in the task logs (every try), in any of the stack's processes' argv, or in the
    output of ``scripts/prod.sh up``."""
    secrets = {k: v for k, v in stack.secrets.items() if v}
    secrets["airflow UI password"] = stack.ui_password
    logs = [(f"{task} try {n}", stack.task_log(run_id, task, n)) for task, last in tries.items()
            for n in range(1, last + 1)]
    files = [(str(p), p.read_text(errors="replace")) for p in (stack.home / "airflow" / "logs").rglob("*")
             if p.is_file()]
    prod_logs = [(str(p), p.read_text(errors="replace")) for p in (stack.home / "prod" / "logs").glob("*.log")]
    argv = [(f"pid {p.pid} argv", " ".join(p.info["cmdline"] or [])) for p in psutil.process_iter(["cmdline"])]
    output = [("prod.sh up output", stack.up_output.replace(stack.ui_password, ""))]  # the login is printed
    found = [f"{where}: {name}" for where, text in [*logs, *files, *prod_logs, *argv, *output]
             for name, value in secrets.items() if value in text
             # The S3 server's access log records who called: the access key id (an identifier, not the
             # secret key) is in every presigned URL MLflow's artifact proxy hands out, as on real S3.
             and not (where.endswith("/s3.log") and name == "AWS_ACCESS_KEY_ID")]
    assert not found, found
    assert logs and files, "no task log found to check"


def test_a_triggered_run_trains_in_the_container_and_lands_everything_in_s3(stack):
    from ctrain import featurestore, prodenv
    from ctrain.settings import Settings

    started = time.monotonic()
    stack.api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})  # new DAGs start paused
    run_id = stack.trigger({"trainer_overrides": {"train.epochs": 3}, "primary_metric_floor": 0.0})
    state = stack.wait(run_id)
    tasks = stack.task_states(run_id)
    assert state == "success", tasks
    print(f"case 1 (trigger to success): {time.monotonic() - started:.0f} s")

    ((run_key, training),) = _results(stack).items()
    train_log = stack.task_log(run_id, "train", tasks["train"][1])
    assert f"launching container {stack.env['CTRAIN_DOCKER_NAME_PREFIX']}" in train_log
    assert "network host" in train_log

    keys = stack.s3_keys()
    assert f"objects/datasets/{training['dataset_version']}/manifest.json" in keys, keys[:50]
    assert any(re.fullmatch(rf"objects/checkpoints/{run_key}/step-\d{{8}}/manifest\.json", k) for k in keys)
    assert f"objects/runs/{run_key}/result.json" in keys
    assert any(k.startswith("objects/reports/validations/") and k.endswith(".json") for k in keys)
    assert any(k.startswith(f"objects/audit/{MODEL}/") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("/MLmodel") for k in keys), "no model artifacts in S3"

    client = stack.mlflow()
    (run,) = _runs_for(client, run_key)
    assert run.info.status == "FINISHED" and run.info.run_id == training["mlflow_run_id"]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.tags["mlflow_run_id"] == run.info.run_id
    # The pipeline signs in as its non-admin service account (the only MLflow credentials its tasks and
    # the container have), granted MANAGE on the model by ctrain.mlflow_auth setup in scripts/prod.sh up:
    # the run, the version and the alias moves above were made with that grant.
    init_log = (stack.home / "prod" / "logs" / "init.log").read_text()
    assert f"{prodenv.SERVICE_USER}: MANAGE on registered model {MODEL}" in init_log, init_log[-2000:]

    # Online (Redis, materialized by the DAG) equals the newest offline row of the entity in the window.
    import pandas as pd

    settings = Settings(home=stack.home, pipelines_dir=stack.home / "pipelines",
                        feast_registry=stack.values["CTRAIN_FEAST_REGISTRY"],
                        feast_online_store=stack.values["CTRAIN_FEAST_ONLINE_STORE"])
    offline = pd.read_parquet(stack.home / "data" / "features" / "customer_stats")
    newest = offline.sort_values(["event_timestamp", "created_timestamp"]).groupby("customer_id").tail(1)
    newest = newest[newest["event_timestamp"] == newest["event_timestamp"].max()]  # in the materialized window
    row = newest.iloc[len(newest) // 2]
    online = featurestore.get_online_features(settings, [{"customer_id": int(row["customer_id"]),
                                                          "merchant_id": 0}])
    for feature in ("customer_avg_amount_30d", "customer_txn_count_7d", "customer_chargeback_rate_90d"):
        assert online[feature] == [pytest.approx(float(row[feature]))], (feature, online[feature], row)

    _assert_no_secret(stack, run_id, {task: n for task, (_, n) in tasks.items()})


def test_a_killed_training_container_is_retried_and_resumes_from_its_s3_checkpoint(stack):
    import docker

    started = time.monotonic()
    before = {k.split("/")[2] for k in stack.s3_keys() if k.startswith("objects/checkpoints/")}
    stack.api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
    # Another config (another run key) that trains long enough to be killed between checkpoints.
    run_id = stack.trigger({"trainer_overrides": {"train.epochs": 40, "train.batch_size": 64,
                                                  "early_stopping.enabled": False},
                            "primary_metric_floor": 0.0})
    client = docker.DockerClient(base_url=stack.env["DOCKER_HOST"])
    killed = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while killed is None and time.monotonic() < deadline:
        new = [k for k in stack.s3_keys() if k.startswith("objects/checkpoints/") and k.endswith("/manifest.json")
               and k.split("/")[2] not in before]
        if new:
            containers = client.containers.list(filters={"name": stack.env["CTRAIN_DOCKER_NAME_PREFIX"]})
            assert len(containers) == 1, [c.name for c in containers]
            containers[0].kill()
            killed = (containers[0].name, new[0].split("/")[2], time.monotonic() - started)
        time.sleep(0.5)
    assert killed, "no checkpoint of the run appeared in S3"
    print(f"killed {killed[0]} at {killed[2]:.0f} s, checkpoint of run key {killed[1]} in S3")
    client.close()

    state = stack.wait(run_id)
    tasks = stack.task_states(run_id)
    assert state == "success", tasks
    print(f"case 2 (trigger to success, kill and retries included): {time.monotonic() - started:.0f} s; "
          f"train tries {tasks['train'][1]}")
    tries = tasks["train"][1]
    assert tries >= 2, tasks
    logs = [stack.task_log(run_id, "train", n) for n in range(1, tries + 1)]
    resumed = [int(m) for m in re.findall(r"resumed from \S*/step-(\d{8})", logs[-1])]
    assert resumed and resumed[0] > 0, logs[-1][-3000:]
    for early in logs[1:-1]:  # a retry before the dead container's lease lapsed was refused, retryably
        assert "leased" in early, early[-2000:]

    run_key = killed[1]
    assert _results(stack)[run_key]["status"] == "succeeded"
    mlflow = stack.mlflow()
    (run,) = _runs_for(mlflow, run_key)
    assert run.info.status == "FINISHED"
    versions = [v for v in mlflow.search_model_versions(f"name = '{MODEL}'") if v.run_id == run.info.run_id]
    assert len(versions) == 1, versions
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == versions[0].version

    _assert_no_secret(stack, run_id, {task: n for task, (_, n) in tasks.items()})
