"""Human approval and Airflow roles on a real Airflow, through its REST API with JWTs.

The module starts the components ``make up`` starts (api-server, scheduler, dag-processor; Airflow 3.3 needs
no triggerer for HITL) on SQLite in a tmp home, with its own pipelines directory: copies of the fraud
definition whose ``governance.approval.required`` is ``always``, assigned to the user ``approver``, one
(``fraud``) waiting an hour, one (``fraud_quick``, its own model) 15 seconds. Then, in order:

- the viewer cannot trigger (403); a trigger by ``operator`` (role user) waits in ``approve``; neither the
  viewer (role) nor ``operator`` (not assigned) may answer (403); ``approver`` rejects -> promote never
  runs, no champion, audit ``human_reject`` with the user and the comment;
- a second trigger (same data and config: training and the model version are reused) is approved ->
  champion moves to that version, audit ``human_approve``;
- ``fraud_quick`` gets no answer -> after its 15 s the task fails, audit ``approval_timeout``, no champion.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from test_trigger_api import request

from ctrain_examples import fraud
from support import airflow_cli

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.slow

USERS = ("admin:admin", "approver:user", "operator:user", "viewer:viewer")
DAG, QUICK_DAG = "continuous_training__fraud", "continuous_training__fraud_quick"
QUICK_MODEL, QUICK_TIMEOUT_S = "fraud_quick_detector", 15
POLICY_VERSION = "approval-test"  # the test's policy: GX success and complete lineage (the defaults) only
DAYS, ROWS_PER_DAY = 20, 800


def port_in_range() -> int:
    """A free loopback port in 17000-17999 (this machine's share for the tests)."""
    for port in random.sample(range(17000, 18000), 1000):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no free port in 17000-17999")


def _definitions(pipelines: Path) -> None:
    from ctrain.settings import PROJECT_ROOT

    tree = yaml.safe_load((PROJECT_ROOT / "pipelines" / "fraud.yaml").read_text())
    tree["governance"]["approval"] = {"required": "always", "approvers": ["approver"], "timeout_s": 3600}
    tree["training"]["config"] = str(PROJECT_ROOT / tree["training"]["config"])
    tree["schedule"] = {"cron": None, "assets": []}  # runs only when a test triggers one
    pipelines.mkdir(parents=True)
    (pipelines / "fraud.yaml").write_text(yaml.safe_dump(tree))
    # This test is about the person, not the policy's rules (a small world): a policy of GX success and
    # complete lineage only (the defaults), no floors, no comparison with the champion.
    (pipelines / tree["governance"]["policy"]).parent.mkdir(parents=True)
    (pipelines / tree["governance"]["policy"]).write_text(f"version: {POLICY_VERSION}\n")
    quick = {**tree, "name": "fraud_quick", "model": {**tree["model"], "name": QUICK_MODEL},
             "governance": {**tree["governance"],
                            "approval": {**tree["governance"]["approval"], "timeout_s": QUICK_TIMEOUT_S}}}
    (pipelines / "fraud_quick.yaml").write_text(yaml.safe_dump(quick))


class Airflow:
    def __init__(self, url: str, home: Path, tokens: dict[str, str]):
        self.url, self.home, self.tokens = url, home, tokens

    def call(self, user: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, text = request(method, f"{self.url}/api/v2{path}", body, self.tokens[user])
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def trigger(self, user: str, dag_id: str) -> tuple[int, Any]:
        return self.call(user, "POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": {}})

    def task_state(self, dag_id: str, run_id: str, task_id: str) -> str | None:
        status, ti = self.call("admin", "GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
        assert status == 200, ti
        return ti["state"]

    def wait_task(self, dag_id: str, run_id: str, task_id: str, states: set[str], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (state := self.task_state(dag_id, run_id, task_id)) not in states:
            assert state not in {"failed", "upstream_failed"} or state in states, self.diagnose(dag_id, run_id)
            assert time.monotonic() < deadline, f"{task_id} is {state} after {timeout_s} s\n" + self.diagnose(
                dag_id, run_id)
            time.sleep(2)
        return state

    def wait_run(self, dag_id: str, run_id: str, timeout_s: float = 300) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            status, run = self.call("admin", "GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            assert status == 200, run
            if run["state"] in {"success", "failed"}:
                return run["state"]
            assert time.monotonic() < deadline, f"run {run_id} is {run['state']} after {timeout_s} s"
            time.sleep(2)

    def task_try(self, dag_id: str, run_id: str, task_id: str) -> int:
        status, ti = self.call("admin", "GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
        assert status == 200, ti
        return ti["try_number"]

    def states(self, dag_id: str, run_id: str) -> dict[str, str]:
        status, tis = self.call("admin", "GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        assert status == 200, tis
        return {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}

    def respond(self, user: str, dag_id: str, run_id: str, option: str, comment: str) -> tuple[int, Any]:
        return self.call(user, "PATCH", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails",
                         {"chosen_options": [option], "params_input": {"comment": comment}})

    def diagnose(self, dag_id: str, run_id: str) -> str:
        logs = "".join(f"--- {p} ---\n{p.read_text()[-3000:]}\n" for p in sorted(self.home.glob("*.log")))
        return f"task states: {self.states(dag_id, run_id)}\n{logs}"


def _env(home: Path, port: int) -> dict[str, str]:
    from ctrain.localenv import airflow_env
    from ctrain.settings import Settings

    pipelines = home / "pipelines"
    settings = Settings(home=home, airflow_port=port, airflow_users=USERS, pipelines_dir=pipelines)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTRAIN_", "AIRFLOW", "MLFLOW_"))}
    env.update(airflow_env(settings))
    env.update({"CTRAIN_PIPELINES_DIR": str(pipelines), "CTRAIN_AIRFLOW_USERS": ",".join(USERS),
                "CTRAIN_AIRFLOW_PORT": str(port), "CTRAIN_MLFLOW_UI_URL": "http://mlflow.test",
                "AIRFLOW__API__WORKERS": "1", "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "3",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5", "AIRFLOW__CORE__PARALLELISM": "4"})
    return env


@pytest.fixture(scope="module")
def airflow(tmp_path_factory) -> Iterator[Airflow]:
    from ctrain.localenv import ensure_logins
    from ctrain.settings import Settings

    home = tmp_path_factory.mktemp("approval")
    _definitions(home / "pipelines")
    fraud.generate(home / "data", days=DAYS, start="2026-01-01", rows_per_day=ROWS_PER_DAY, seed=0)
    port = port_in_range()
    env = _env(home, port)
    done = airflow_cli(["db", "migrate"], env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    passwords = ensure_logins(Settings(home=home, airflow_users=USERS))
    from ctrain import registry

    registry.get_client(Settings(home=home))  # the MLflow store exists before two tasks could race to create it
    airflow_bin = str(Path(sys.executable).with_name("airflow"))
    procs = []
    for name, args in {"api-server": ["api-server"], "scheduler": ["scheduler", "--skip-serve-logs"],
                       "dag-processor": ["dag-processor"]}.items():
        with (home / f"{name}.log").open("w") as out:
            procs.append(subprocess.Popen([airflow_bin, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while request("GET", f"{url}/api/v2/monitor/health")[0] != 200:
            assert all(p.poll() is None for p in procs), "an Airflow component exited; logs in " + str(home)
            assert time.monotonic() < deadline, "api-server not up after 180 s; logs in " + str(home)
            time.sleep(1)
        tokens = {}
        for user, password in passwords.items():
            status, body = request("POST", f"{url}/auth/token", {"username": user, "password": password})
            assert status == 201, body
            tokens[user] = json.loads(body)["access_token"]
        api = Airflow(url, home, tokens)
        for dag_id in (DAG, QUICK_DAG):
            deadline = time.monotonic() + 240
            while api.call("admin", "GET", f"/dags/{dag_id}")[0] != 200:
                assert time.monotonic() < deadline, f"{dag_id} not parsed after 240 s"
                time.sleep(2)
            status, body = api.call("admin", "PATCH", f"/dags/{dag_id}", {"is_paused": False})
            assert status == 200, body
        yield api
    finally:
        for proc in procs:
            os.killpg(proc.pid, 15)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def _settings(api: Airflow, pipeline: str = "fraud"):
    from ctrain.settings import Settings

    return Settings(home=api.home, pipelines_dir=api.home / "pipelines", pipeline=pipeline)


def _audit(api: Airflow, model: str) -> list[dict[str, Any]]:
    """Every audit record of ``model`` but the registrations' (``register``: the challenger alias move),
    oldest first."""
    from ctrain import audit

    return [e.doc for e in audit.read_chain(_settings(api), model)
            if e.doc["action"] != "register"]


def _champion(api: Airflow, pipeline: str = "fraud") -> str | None:
    from ctrain import registry

    settings = _settings(api, pipeline)
    return registry.alias_version(registry.get_client(settings), settings.model_name, registry.CHAMPION)


def _waiting_run(api: Airflow, dag_id: str, user: str = "operator") -> str:
    """Trigger ``dag_id`` as ``user``; return the run id once ``approve`` waits for a person.

    Also waits for the process that parked the task to exit: a person answers minutes later, and an
    answer within the second or two that process takes to exit races it in Airflow 3.3.2 (the scheduler
    then sees the resumed task "running" and the parking process "success", and retries it; the approve
    task's retry keeps the recorded decision, ``approval.earlier_decision``)."""
    import psutil

    status, run = api.trigger(user, dag_id)
    assert status == 200, run
    run_id = run["dag_run_id"]
    api.wait_task(dag_id, run_id, "approve", {"awaiting_input"}, timeout_s=900)
    status, ti = api.call("admin", "GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approve")
    deadline = time.monotonic() + 60
    while ti.get("pid") and psutil.pid_exists(ti["pid"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(5)  # the scheduler's next loop handles the parked process's exit
    return run_id


def test_a_viewer_cannot_trigger(airflow):
    status, body = airflow.trigger("viewer", DAG)
    assert status == 403, body
    status, runs = airflow.call("admin", "GET", f"/dags/{DAG}/dagRuns")
    assert status == 200 and runs["total_entries"] == 0, runs
    assert airflow.call("viewer", "GET", f"/dags/{DAG}")[0] == 200  # a viewer still sees it


def test_a_rejection_is_audited_and_nothing_is_promoted(airflow):
    run_id = _waiting_run(airflow, DAG)
    status, detail = airflow.call("admin", "GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails")
    assert status == 200, detail
    assert detail["subject"].startswith("Promote fraud_detector v1 to champion?")
    body = detail["body"]
    assert "would become the first champion" in body and f"Policy `{POLICY_VERSION}` approved it" in body
    assert "| `test_roc_auc` (primary, higher is better) |" in body and "| `test_pr_auc` |" in body
    assert "- pass validation: GX validation of the training snapshot" in body and "- pass lineage: lineage complete" in body
    assert "http://mlflow.test/#/models/fraud_detector/versions/1" in body
    assert [u["name"] for u in detail["assigned_users"]] == ["approver"]
    assert detail["defaults"] is None

    # Who may answer: not a viewer (role), not a user who is not assigned; the request stays open.
    assert airflow.respond("viewer", DAG, run_id, "Approve", "")[0] == 403
    status, body = airflow.respond("operator", DAG, run_id, "Approve", "looks fine to me")
    assert status == 403 and "not a respondent" in json.dumps(body), body
    assert airflow.task_state(DAG, run_id, "approve") == "awaiting_input"

    status, body = airflow.respond("approver", DAG, run_id, "Reject", "pr_auc too low for launch")
    assert status == 200, body
    assert airflow.wait_run(DAG, run_id) == "failed"
    states = airflow.states(DAG, run_id)
    assert states["approve"] == "failed" and states["promote"] == "upstream_failed", states
    assert airflow.task_try(DAG, run_id, "approve") == 1, "the approve task was retried"
    assert _champion(airflow) is None
    [record] = [r for r in _audit(airflow, "fraud_detector") if r["action"] == "human_reject"]
    assert record["decided_by"] == "human:approver" and record["version"] == "1"
    assert record["details"]["comment"] == "pr_auc too low for launch"
    assert record["details"]["approvers"] == ["approver"] and record["details"]["responded_at"]
    assert record["dag_run_id"] == run_id and record["policy_version"] == POLICY_VERSION
    assert not [r for r in _audit(airflow, "fraud_detector") if r["action"] in {"promote", "human_approve"}]


def test_an_approval_is_audited_and_the_champion_moves(airflow):
    run_id = _waiting_run(airflow, DAG)
    status, body = airflow.respond("approver", DAG, run_id, "Approve", "ship it")
    assert status == 200, body
    assert airflow.wait_run(DAG, run_id) == "success", airflow.diagnose(DAG, run_id)
    assert airflow.states(DAG, run_id)["promote"] == "success"
    assert _champion(airflow) == "1"  # the same data and config: the rejected run's version, reused
    records = _audit(airflow, "fraud_detector")
    [approved] = [r for r in records if r["action"] == "human_approve"]
    assert approved["decided_by"] == "human:approver" and approved["details"]["comment"] == "ship it"
    assert approved["dag_run_id"] == run_id
    # this run's policy decision (on the version the rejected run registered), the person's, the move
    assert [r["action"] for r in records if r["dag_run_id"] == run_id] == ["approve", "human_approve", "promote"]
    from ctrain import registry

    tags = registry.get_client(_settings(airflow)).get_model_version("fraud_detector", "1").tags
    assert tags["approval"] == "human_approve" and tags["approval_by"] == "human:approver"
    assert tags["approval_comment"] == "ship it" and tags["approval_audit"].endswith(".json")


def test_no_answer_in_time_rejects(airflow):
    started = time.monotonic()
    run_id = _waiting_run(airflow, QUICK_DAG, user="approver")
    waited_from = time.monotonic()
    assert airflow.wait_run(QUICK_DAG, run_id, timeout_s=QUICK_TIMEOUT_S + 120) == "failed"
    waited = time.monotonic() - waited_from
    states = airflow.states(QUICK_DAG, run_id)
    assert states["approve"] == "failed" and states["promote"] == "upstream_failed", states
    assert _champion(airflow, "fraud_quick") is None
    [policy_yes, record] = _audit(airflow, QUICK_MODEL)
    assert policy_yes["action"] == "approve" and policy_yes["dag_run_id"] == run_id
    assert record["action"] == "approval_timeout" and record["decided_by"] == "timeout"
    assert record["details"]["timeout_s"] == QUICK_TIMEOUT_S and record["details"]["chosen"] is None
    assert record["dag_run_id"] == run_id
    print(f"timeout run: {waited:.0f} s from awaiting_input to failed, {time.monotonic() - started:.0f} s in all")
