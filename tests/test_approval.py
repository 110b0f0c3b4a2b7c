"""ctrain.approval without a running Airflow (the request, the answers, the records on a real SQLite MLflow
and file:// audit trail), the Airflow users of the embedded environment, and ctrain.mlflow_auth's input
checks. The approval on a real Airflow: tests/test_approval_airflow.py; MLflow permissions on a real
basic-auth server: tests/test_mlflow_auth.py."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime

import pytest
from test_registry import _model_run

from ctrain import approval, audit, registry
from ctrain.errors import ConfigError
from ctrain.settings import PROJECT_ROOT, Settings
from support import pipeline_settings

APPROVAL = {"required": True, "rule": "always", "approvers": ["approver", "lead"], "timeout_s": 600}
DECISION = {"approved": True, "policy_version": "fraud-v1", "approval": APPROVAL,
            "reasons": ["test_roc_auc=0.9100 >= floor 0.8000 (higher is better)",
                        "within 0.005 of champion's 0.9050 on the same test split"],
            "metrics_compared": {"metric": "test_roc_auc", "challenger": 0.91, "champion": 0.905}}
EVALUATION = {"challenger": {"test_roc_auc": 0.91, "test_pr_auc": 0.40},
              "champion": {"test_roc_auc": 0.905, "test_pr_auc": 0.42}, "champion_version": "3"}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("approval")  # one MLflow DB for the module: creating one costs seconds


@pytest.fixture
def registered(home, request):
    """Settings and the registration of a real model version (one registered model per test)."""
    name = "m_" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    settings = pipeline_settings(home, pipelines=home / "pipelines" / name, model__name=name,
                                 model__description="approval test model")
    settings = Settings(**{**{f: getattr(settings, f) for f in ("home", "pipelines_dir", "pipeline")},
                           "mlflow_ui_url": "https://mlflow.example.com/"})
    client = registry.get_client(settings)
    run_id, model_uri = _model_run(client, settings, name)
    version = registry.register_challenger(client, settings, run_id, model_uri, {"dataset_version": "d1"})
    return settings, {"model": name, "version": version, "alias": "challenger"}


def _audit(settings: Settings, model: str) -> list[dict]:
    """The model's audit records but the registration's own (``register``: the challenger alias move)."""
    return [e.doc for e in audit.read_chain(settings, model) if e.doc["action"] != "register"]


def test_the_request_shows_the_decision_every_reason_the_table_and_the_links(registered):
    settings, registration = registered
    request = approval.build_request(settings, DECISION, registration, EVALUATION,
                                     model_card="s3://bucket/cards/m/1/model_card.md")
    model, version = registration["model"], registration["version"]
    assert request.subject == f"Promote {model} v{version} to champion?"
    assert request.approvers == ["approver", "lead"] and request.timeout_s == 600
    body = request.body
    assert f"**{model} v{version}** would replace champion v3." in body
    assert "Policy `fraud-v1` approved it" in body and "No answer within 600 s rejects it." in body
    for reason in DECISION["reasons"]:
        assert f"- {reason}" in body
    assert "| metric | challenger | champion (v3) | difference |" in body
    assert "| `test_roc_auc` (primary, higher is better) | 0.9100 | 0.9050 | +0.0050 |" in body
    assert "| `test_pr_auc` | 0.4000 | 0.4200 | -0.0200 |" in body
    assert f"Model version in MLflow: https://mlflow.example.com/#/models/{model}/versions/{version}" in body
    assert "Model card: s3://bucket/cards/m/1/model_card.md" in body


def test_a_first_model_has_no_champion_column_values(registered):
    settings, registration = registered
    first = {"challenger": EVALUATION["challenger"], "champion": None, "champion_version": None}
    body = approval.build_request(settings, DECISION, registration, first).body
    assert "would become the first champion" in body and "Model card" not in body
    assert "| `test_pr_auc` | 0.4000 | n/a | n/a |" in body


def test_answers_from_airflow_events():
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    answer = approval.response_from_event({"chosen_options": ["Approve"], "params_input": {"comment": "ok"},
                                           "responded_at": at, "responded_by_user": {"id": "lead", "name": "lead"}})
    assert answer == approval.Response(chosen="Approve", user="lead", at=at, comment="ok")
    # The scheduler's answer when the request times out without defaults (this task never has any).
    timeout = {"error": "The Human-in-the-loop response timeout has passed without a response.",
               "error_type": "timeout"}
    assert approval.response_from_event(timeout).timed_out
    assert approval.response_from_event(timeout).chosen == "Reject"
    # What the scheduler would send had defaults been set: an option nobody chose. Refused.
    with pytest.raises(approval.CtrainError, match="no responding user"):
        approval.response_from_event({"chosen_options": ["Approve"], "params_input": {}, "responded_at": at,
                                      "responded_by_user": None, "timedout": True})
    with pytest.raises(approval.CtrainError, match="exactly one of"):
        approval.response_from_event({"chosen_options": ["Approve", "Reject"], "responded_by_user": {"id": "x"}})


def test_an_approval_is_audited_and_tagged(registered):
    settings, registration = registered
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    outcome = approval.record(settings, approval.Response("Approve", "lead", at, "ship it"), DECISION,
                              registration, EVALUATION, "manual__1")
    [audit] = _audit(settings, registration["model"])
    assert audit["action"] == outcome["action"] == "human_approve" and audit["decided_by"] == "human:lead"
    assert audit["details"] == {"responded_at": at.isoformat(), "comment": "ship it", "approvers": ["approver", "lead"],
                                "rule": "always", "timeout_s": 600, "chosen": "Approve"}
    assert audit["previous_champion"] == "3" and audit["reasons"] == DECISION["reasons"]
    assert audit["dag_run_id"] == "manual__1" and audit["policy_version"] == "fraud-v1"
    tags = registry.get_client(settings).get_model_version(registration["model"], registration["version"]).tags
    assert tags["approval"] == "human_approve" and tags["approval_by"] == "human:lead"
    assert tags["approval_comment"] == "ship it" and tags["approval_audit"] == outcome["audit_uri"]


@pytest.mark.parametrize(("response", "action", "decided_by", "message"), [
    (approval.Response("Reject", "lead", datetime(2026, 12, 1, tzinfo=UTC), "pr_auc regressed"),
     "human_reject", "human:lead", "rejected by lead (pr_auc regressed)"),
    (approval.Response("Reject", None, None, "", timed_out=True), "approval_timeout", "timeout",
     "nobody answered the approval request within 600 s"),
])
def test_a_rejection_or_a_timeout_is_audited_then_fails(registered, response, action, decided_by, message):
    settings, registration = registered
    with pytest.raises(approval.ApprovalRejected, match=re.escape(message)):
        approval.record(settings, response, DECISION, registration, EVALUATION, "manual__2")
    [audit] = _audit(settings, registration["model"])
    assert audit["action"] == action and audit["decided_by"] == decided_by
    tags = registry.get_client(settings).get_model_version(registration["model"], registration["version"]).tags
    assert tags["approval"] == action
    assert registry.alias_version(registry.get_client(settings), registration["model"], registry.CHAMPION) is None


def test_a_recorded_decision_stands_for_its_run(registered):
    settings, registration = registered
    model, version = registration["model"], registration["version"]
    assert approval.earlier_decision(approval.version_tags(settings, model, version), "manual__1") is None
    with pytest.raises(approval.ApprovalRejected):
        approval.record(settings, approval.Response("Reject", "lead", None, "no"), DECISION, registration,
                        EVALUATION, "manual__1")
    tags = approval.version_tags(settings, model, version)
    with pytest.raises(approval.ApprovalRejected, match="already answered .human_reject by human:lead"):
        approval.earlier_decision(tags, "manual__1")  # a retry of that run's task does not ask again
    assert approval.earlier_decision(tags, "manual__2") is None  # another run asks afresh
    approval.record(settings, approval.Response("Approve", "lead", None, "yes"), DECISION, registration,
                    EVALUATION, "manual__2")
    again = approval.earlier_decision(approval.version_tags(settings, model, version), "manual__2")
    assert again["action"] == "human_approve" and again["decided_by"] == "human:lead"


def test_the_operator_refuses_defaults():
    with pytest.raises(ValueError, match="no defaults"):
        approval.ApprovalTask(task_id="approve", pipeline="fraud", defaults="Approve")


def test_every_airflow_user_gets_a_private_generated_password(tmp_path):
    from ctrain.localenv import airflow_env, ensure_login, ensure_logins, password_file

    settings = Settings(home=tmp_path, airflow_users=("admin:admin", "approver:user", "viewer:viewer"))
    passwords = ensure_logins(settings)
    assert set(passwords) == {"admin", "approver", "viewer"} and len(set(passwords.values())) == 3
    assert password_file(settings).stat().st_mode & 0o777 == 0o600
    assert ensure_login(settings) == ("admin", passwords["admin"])
    more = Settings(home=tmp_path, airflow_users=("admin:admin", "approver:user", "viewer:viewer", "ops:op"))
    again = ensure_logins(more)
    assert {k: again[k] for k in passwords} == passwords and again["ops"]  # existing passwords are kept
    assert airflow_env(more)["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == \
        "admin:admin,approver:user,viewer:viewer,ops:op"


def test_airflow_users_are_checked():
    from ctrain.localenv import login_user

    with pytest.raises(ValueError, match="user:role pairs"):
        Settings(airflow_users="admin:root")
    with pytest.raises(ConfigError, match="has no admin"):
        login_user(Settings(airflow_users="viewer:viewer"))


def test_mlflow_auth_config_and_inputs(tmp_path, monkeypatch):
    from ctrain.mlflow_auth import read_users, setup, write_config

    config = write_config(tmp_path / "auth" / "basic_auth.ini")
    assert config.stat().st_mode & 0o777 == 0o600
    text = config.read_text()
    assert "default_permission = READ" in text and f"sqlite:///{tmp_path / 'auth' / 'basic_auth.db'}" in text
    assert "admin_password" not in text
    people = tmp_path / "people.json"
    people.write_text(json.dumps({"alice": "pw"}))
    people.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        read_users(people)
    people.chmod(0o600)
    assert read_users(people) == {"alice": "pw"}
    people.write_text('{"alice": 1}')
    with pytest.raises(ConfigError, match="non-empty password strings"):
        read_users(people)
    with pytest.raises(ConfigError, match="basic-auth"):
        setup(Settings(home=tmp_path, pipelines_dir=PROJECT_ROOT / "pipelines"))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_AUTH_ADMIN_PASSWORD is not set"):
        setup(Settings(home=tmp_path, mlflow_tracking_uri="http://127.0.0.1:17999"))
