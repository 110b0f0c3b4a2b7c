"""Human approval of a promotion the policy allowed: Airflow's HITL ``ApprovalOperator``, closed on timeout.

The ``approve`` task of the training DAG sits between ``govern`` and ``promote``. When govern's result says
``approval.required`` (``pipeline.approval_needed``), it asks the definition's approvers (Airflow user names,
``governance.approval.approvers``; empty: any user whose role may respond) with a Markdown body: the policy's
decision, every reason, the challenger-vs-champion table of every test metric and a link to the model
version in the MLflow UI (and its ``model_card`` tag when the version has one). The task waits in Airflow's
``awaiting_input`` state for at most ``approval.timeout_s``.

Every outcome is audited (``registry.write_audit``) and tagged on the model version:

- Approve: ``human_approve``, decided_by ``human:<user>``; promote runs.
- Reject: ``human_reject``; the task fails (``ApprovalRejected``), so promote never runs.
- No answer in time: ``approval_timeout``, decided_by ``timeout``; the task fails the same way.

A decision stands for its DAG run (tag ``approval_run``): a retried task does not ask again.

Why not ``defaults``: Airflow's scheduler answers a timed-out HITL request with its ``defaults`` as if a
person had chosen them, so ``defaults="Approve"`` approves on timeout. The operator here has no defaults:
a timeout reaches ``execute_complete`` as an error event, which this module records as a rejection.

When approval is not required the task is skipped and promote (trigger rule ``none_failed``) still runs.
Everything but :class:`ApprovalTask` (the Airflow shell) is plain functions, tested without a running Airflow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamsDict

from ctrain import registry
from ctrain.errors import CtrainError, fail_fast

if TYPE_CHECKING:
    from ctrain.settings import Settings

log = logging.getLogger(__name__)

APPROVE, REJECT = ApprovalOperator.APPROVE, ApprovalOperator.REJECT
COMMENT = "comment"  # the one form field of the request: why the person decided as they did
ACTIONS = {APPROVE: "human_approve", REJECT: "human_reject"}
TIMEOUT_ACTION = "approval_timeout"


class ApprovalRejected(CtrainError):
    """A person rejected the promotion, or nobody answered before the timeout (which counts as a no)."""


@dataclass(frozen=True)
class ApprovalRequest:
    """What the HITL task shows and whom it asks."""

    subject: str
    body: str
    approvers: list[str]
    timeout_s: int


@dataclass(frozen=True)
class Response:
    """A person's answer, or the timeout (``user`` None, ``chosen`` REJECT)."""

    chosen: str
    user: str | None
    at: datetime | None
    comment: str
    timed_out: bool = False


def model_version_url(settings: Settings, model: str, version: str) -> str:
    """The model version's page in the MLflow UI (``CTRAIN_MLFLOW_UI_URL``, else ``make up``'s MLflow)."""
    from ctrain.localenv import ui_urls

    base = (settings.mlflow_ui_url or ui_urls(settings)["mlflow"]).rstrip("/")
    return f"{base}/#/models/{model}/versions/{version}"


def comparison_table(settings: Settings, evaluation: dict[str, Any]) -> str:
    """Markdown table of every test metric of the definition: challenger, champion and their difference."""
    challenger, champion = evaluation["challenger"], evaluation.get("champion") or {}
    definition = settings.definition
    champion_version = evaluation.get("champion_version")
    head = f"champion (v{champion_version})" if champion_version else "champion"
    rows = [f"| metric | challenger | {head} | difference |", "| --- | ---: | ---: | ---: |"]
    for name in definition.test_metrics:
        mine, theirs = challenger.get(name), champion.get(name)
        primary = " (primary, " + definition.metrics.direction + " is better)" \
            if name == definition.primary_test_metric else ""
        diff = f"{mine - theirs:+.4f}" if mine is not None and theirs is not None else "n/a"
        rows.append(f"| `{name}`{primary} | {_num(mine)} | {_num(theirs)} | {diff} |")
    return "\n".join(rows)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def build_request(settings: Settings, decision: dict[str, Any], registration: dict[str, Any],
                  evaluation: dict[str, Any], model_card: str | None = None) -> ApprovalRequest:
    """The subject and Markdown body of the approval request for ``registration``'s model version."""
    model, version = registration["model"], registration["version"]
    approval = decision["approval"]
    champion = evaluation.get("champion_version")
    replaces = f"replace champion v{champion}" if champion else "become the first champion"
    verdict = "approved" if decision["approved"] else "rejected"
    lines = [
        f"**{model} v{version}** would {replaces}.",
        "",
        f"Policy `{decision['policy_version']}` {verdict} it; a person must confirm "
        f"(approval rule `{approval['rule']}`). No answer within {approval['timeout_s']} s rejects it.",
        "",
        "Reasons:",
        *[f"- {reason}" for reason in decision["reasons"]],
        "",
        comparison_table(settings, evaluation),
        "",
        f"Model version in MLflow: {model_version_url(settings, model, version)}",
    ]
    if model_card:
        lines.append(f"Model card: {model_card}")
    return ApprovalRequest(subject=f"Promote {model} v{version} to champion?", body="\n".join(lines),
                           approvers=list(approval["approvers"]), timeout_s=int(approval["timeout_s"]))


def version_tags(settings: Settings, model: str, version: str) -> dict[str, str]:
    """The model version's tags: its ``model_card`` (set by the governance step when it writes a card)
    and any decision already recorded (``approval``, ``approval_run``, ...)."""
    return dict(registry.get_client(settings).get_model_version(model, version).tags)


def earlier_decision(tags: dict[str, str], dag_run_id: str) -> dict[str, Any] | None:
    """The decision already recorded on the version for this DAG run, if any.

    A decision stands for its run: a retry of the approve task (Airflow can retry one that was resumed
    right as its parking process exited) must not ask again, or a rejection could be overturned by a
    second answer. Raises :class:`ApprovalRejected` for a recorded rejection or timeout."""
    if tags.get("approval_run") != dag_run_id or tags.get("approval") not in {*ACTIONS.values(), TIMEOUT_ACTION}:
        return None
    if tags["approval"] != ACTIONS[APPROVE]:
        raise ApprovalRejected(f"not promoted: this run's approval request was already answered "
                               f"({tags['approval']} by {tags.get('approval_by')}); audit {tags.get('approval_audit')}")
    return {"action": tags["approval"], "decided_by": tags.get("approval_by"), "audit_uri": tags.get("approval_audit"),
            "responded_at": tags.get("approval_at"), "comment": tags.get("approval_comment", "")}


def record(settings: Settings, response: Response, decision: dict[str, Any], registration: dict[str, Any],
           evaluation: dict[str, Any], dag_run_id: str) -> dict[str, Any]:
    """Audit the human decision (or the timeout) and tag the model version with it.

    Returns the outcome for an approval; raises :class:`ApprovalRejected` for a rejection or a timeout,
    after the record is written, so promote never runs and the audit trail says why."""
    model, version = registration["model"], registration["version"]
    if response.timed_out:
        action, decided_by = TIMEOUT_ACTION, "timeout"
    else:
        action, decided_by = ACTIONS[response.chosen], f"human:{response.user}"
    approval = decision["approval"]
    details = {
        "responded_at": response.at.isoformat() if response.at else None,
        "comment": response.comment,
        "approvers": list(approval["approvers"]),
        "rule": approval["rule"],
        "timeout_s": approval["timeout_s"],
        "chosen": None if response.timed_out else response.chosen,
    }
    audit_uri = registry.write_audit(settings, registry.AuditRecord(
        model=model, version=version, action=action, decided_by=decided_by,
        policy_version=decision["policy_version"], previous_champion=evaluation.get("champion_version"),
        metrics_compared=decision["metrics_compared"], reasons=decision["reasons"], dag_run_id=dag_run_id,
        at=time.time(), policy_sha256=decision.get("policy_sha256", ""), details=details,
    ))
    client = registry.get_client(settings)
    for key, value in {"approval": action, "approval_by": decided_by, "approval_audit": audit_uri,
                       "approval_at": details["responded_at"] or "", "approval_comment": response.comment,
                       "approval_run": dag_run_id}.items():
        client.set_model_version_tag(model, version, key, value[:5000])
    outcome = {"action": action, "decided_by": decided_by, "audit_uri": audit_uri, **details}
    if response.timed_out:
        raise ApprovalRejected(f"{model} v{version} not promoted: nobody answered the approval request within "
                               f"{approval['timeout_s']} s (governance.approval.timeout_s); a timeout rejects. "
                               f"Audit: {audit_uri}")
    if response.chosen != APPROVE:
        comment = f" ({response.comment})" if response.comment else ""
        raise ApprovalRejected(f"{model} v{version} not promoted: rejected by {response.user}{comment}. "
                               f"Audit: {audit_uri}")
    log.info("%s v%s approved by %s; audit %s", model, version, response.user, audit_uri)
    return outcome


def response_from_event(event: dict[str, Any]) -> Response:
    """A :class:`Response` from the event Airflow resumes a HITL task with (a person's answer or the
    scheduler's timeout error). Anything else is refused: it is not an answer anyone gave."""
    if "error" in event:
        if event.get("error_type") != "timeout":
            raise CtrainError(f"approval request failed: {event['error']} ({event.get('error_type')})")
        return Response(chosen=REJECT, user=None, at=None, comment="", timed_out=True)
    chosen = event["chosen_options"]
    if len(chosen) != 1 or chosen[0] not in ACTIONS:
        raise CtrainError(f"approval answer {chosen!r}: expected exactly one of {sorted(ACTIONS)}")
    user = event.get("responded_by_user") or {}
    if not user.get("name") and not user.get("id"):
        # Only the scheduler answers without a user, and only with defaults, which this task never has.
        raise CtrainError("approval answer has no responding user; refusing to treat it as a decision")
    at = event.get("responded_at")
    return Response(chosen=chosen[0], user=user.get("name") or user.get("id"),
                    at=datetime.fromisoformat(at) if isinstance(at, str) else at,
                    comment=str((event.get("params_input") or {}).get(COMMENT) or ""))


class ApprovalTask(ApprovalOperator):
    """The DAG's ``approve`` task: Airflow's ApprovalOperator with no defaults (a timeout never approves),
    its request built at run time from the upstream tasks' results, and every answer audited.

    ``decision_task``, ``registration_task`` and ``evaluation_task`` are the task ids whose XCom results
    it reads; ``pipeline`` names the definition (settings)."""

    def __init__(self, *, pipeline: str, decision_task: str = "govern", registration_task: str = "register",
                 evaluation_task: str = "evaluate", **kwargs: Any) -> None:
        if "defaults" in kwargs:
            raise ValueError("ApprovalTask takes no defaults: a timeout must reject, never choose an option")
        # Airflow merges the DAG's params in here; the operator keeps only task-level ones for its form.
        params = ParamsDict(kwargs.pop("params", None) or {})
        params[COMMENT] = Param("", type="string", description="Why you approve or reject.", source="task")
        super().__init__(subject="Promotion approval", body=None, defaults=None, params=params, **kwargs)
        self.pipeline = pipeline
        self.upstream_results = (decision_task, registration_task, evaluation_task)

    @property
    def task_bodies(self) -> tuple[Any, ...]:
        """The functions its execute and execute_complete run, each wearing @fail_fast (checked by the
        DAG integrity test like every other task's callable)."""
        return (_execute, _complete)

    def _inputs(self, context: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        ti = context["ti"]
        decision, registration, evaluation = (ti.xcom_pull(task_ids=t) for t in self.upstream_results)
        return decision, registration, evaluation

    def execute(self, context: Any) -> Any:
        return _execute(self, context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        return _complete(self, context, event)


@fail_fast
def _execute(task: ApprovalTask, context: Any) -> Any:
    """Skip when no person must approve; else fill in the request and wait for an answer."""
    from airflow.providers.standard.operators.hitl import HITLOperator
    from airflow.sdk.exceptions import AirflowSkipException

    from ctrain.settings import get_settings

    decision, registration, evaluation = task._inputs(context)
    approval = decision["approval"]
    if not approval["required"]:
        raise AirflowSkipException(f"no human approval required (governance.approval.required: {approval['rule']})")
    settings = get_settings(pipeline=task.pipeline)
    tags = version_tags(settings, registration["model"], registration["version"])
    if (decided := earlier_decision(tags, context["run_id"])) is not None:
        log.info("this run's approval was already given (%s); not asking again", decided["decided_by"])
        return decided
    request = build_request(settings, decision, registration, evaluation, model_card=tags.get("model_card"))
    task.subject, task.body = request.subject, request.body
    # Airflow checks a responder's user id against these; the simple auth manager's id is the user name
    # (an auth manager with other ids, e.g. FAB's numbers, needs the ids in the definition's approvers).
    task.assigned_users = [{"id": name, "name": name} for name in request.approvers] or None
    task.response_timeout = timedelta(seconds=request.timeout_s)
    log.info("asking %s to approve: %s", ", ".join(request.approvers) or "any approver", request.subject)
    return HITLOperator.execute(task, context)


@fail_fast
def _complete(task: ApprovalTask, context: Any, event: dict[str, Any]) -> Any:
    """Record the answer (or the timeout); a rejection or timeout fails the task after it is recorded."""
    from ctrain.settings import get_settings

    decision, registration, evaluation = task._inputs(context)
    response = response_from_event(event)
    return record(get_settings(pipeline=task.pipeline), response, decision, registration, evaluation,
                  context["run_id"])
