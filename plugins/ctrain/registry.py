"""MLflow side of the pipeline: the training run per run key, model versions, aliases and their audit trail.

One registered model per pipeline (the definition's ``model.name``) with aliases ``challenger``, ``champion`` and
``previous``. Every version carries lineage tags; every alias move writes an audit record to
``{object_root}/audit/{model}/`` and onto the version's tags. All calls are idempotent for their inputs,
so a retried task never creates a second run or a second version for the same run key.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ctrain.errors import CtrainError, ServiceUnavailable, is_terminal

if TYPE_CHECKING:
    from collections.abc import Iterator

    from mlflow import MlflowClient

    from ctrain.settings import Settings

log = logging.getLogger(__name__)

RUN_KEY_TAG = "ctrain.run_key"
FAILURE_TAG = "last_failure"  # same tag as the trainer's: one place to read why a run failed
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


class PromotionConflict(CtrainError):
    """The champion changed between evaluation and promotion (compare-and-set failed)."""


@dataclass(frozen=True)
class TrainingRun:
    run_id: str
    status: str  # MLflow run status: RUNNING, FINISHED, FAILED, KILLED
    created: bool


def get_client(settings: Settings) -> MlflowClient:
    """A client on the settings' MLflow (``CTRAIN_MLFLOW_TRACKING_URI``, else the embedded SQLite store),
    which also becomes this process's global MLflow: some MLflow 3 calls (registering a logged model,
    resolving ``models:/`` URIs) look things up through the global client whatever client they were called
    on. Every ctrain step gets its MLflow from here or from :func:`mlflow_at`, never from
    ``MLFLOW_TRACKING_URI``."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(settings.resolved_tracking_uri)
    mlflow.set_registry_uri(settings.resolved_tracking_uri)
    return MlflowClient(tracking_uri=settings.resolved_tracking_uri, registry_uri=settings.resolved_tracking_uri)


@contextlib.contextmanager
def mlflow_at(settings: Settings) -> Iterator[None]:
    """MLflow's global tracking and registry URI set to the settings' one for the duration, restored after.

    For MLflow calls that take no client: ``download_artifacts(tracking_uri=...)`` is not enough, since
    for a logged model MLflow looks the model up through the global client, whatever URI it was given.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri = settings.resolved_tracking_uri
    saved = registry_utils._registry_uri
    registry_utils.set_registry_uri(uri)
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        registry_utils._registry_uri = saved


def ensure_experiment(client: MlflowClient, settings: Settings) -> str:
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(settings.experiment_name, artifact_location=settings.resolved_artifact_root)


def training_run_for(client: MlflowClient, settings: Settings, run_key: str, tags: dict[str, str]) -> TrainingRun:
    """The MLflow run for ``run_key``: the existing one (finished or to resume) or a new one."""
    experiment_id = ensure_experiment(client, settings)
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", order_by=["attributes.start_time DESC"]
    )
    if existing:
        run = existing[0]
        log.info("run key %s already has MLflow run %s (%s)", run_key, run.info.run_id, run.info.status)
        return TrainingRun(run.info.run_id, run.info.status, created=False)
    run = client.create_run(experiment_id, tags={RUN_KEY_TAG: run_key, **tags}, run_name=f"train-{run_key[:12]}")
    return TrainingRun(run.info.run_id, run.info.status, created=True)


def close_failed_run(client: MlflowClient, run_id: str, exc: BaseException) -> str:
    """Close the training run after a failed attempt; returns the status set.

    FAILED for a terminal error; KILLED for a retryable one (the retry reopens the same run, found by
    its run key). The reason goes to the ``last_failure`` tag, the one the trainer sets when it closes
    the run itself: the pipeline created the run, so it closes it on every failure path, including the
    ones where the trainer died before it could (a bad ``model.kwargs``, a refused config, a kill).
    """
    status = "FAILED" if is_terminal(exc) else "KILLED"
    try:
        client.set_tag(run_id, FAILURE_TAG, f"{type(exc).__name__}: {exc}"[:5000])
        client.set_terminated(run_id, status=status)
    except Exception:  # the task's own error is the one to report; this one is only logged
        log.exception("could not close MLflow run %s as %s", run_id, status)
    return status


def register_challenger(client: MlflowClient, settings: Settings, run_id: str, model_uri: str,
                        lineage: dict[str, str]) -> str:
    """Register the run's model (once) with lineage tags and point ``challenger`` at it; returns the version."""
    from mlflow.exceptions import MlflowException

    name = settings.model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=settings.definition.model.description)
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if versions:
        version = versions[0].version
        log.info("run %s is already registered as %s v%s", run_id, name, version)
    else:
        mv = client.create_model_version(name, source=model_uri, run_id=run_id, model_id=_model_id(model_uri),
                                         tags={k: str(v) for k, v in lineage.items()})
        version = mv.version
        _wait_ready(client, name, version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return str(version)


def _model_id(model_uri: str) -> str:
    """The MLflow 3 logged-model id of ``model_uri``: the ``models:/m-<id>`` URI trainer.export returns
    (result.json's ``model_uri``)."""
    model_id = model_uri.removeprefix("models:/")
    if not model_uri.startswith("models:/m-") or "/" in model_id:
        raise CtrainError(f"model_uri {model_uri!r}: expected the logged model's models:/m-<id> URI that "
                          "trainer.export returns (result.json's model_uri)")
    return model_id


def _wait_ready(client: MlflowClient, name: str, version: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get_model_version(name, version).status != "READY":
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"model version {name} v{version} not READY after {timeout_s}s")
        time.sleep(0.2)


def version_of_run(client: MlflowClient, name: str, run_id: str) -> str | None:
    """The version of ``name`` registered from ``run_id`` (register_challenger makes at most one), if any."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return str(versions[0].version) if versions else None


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@dataclass(frozen=True)
class AuditRecord:
    model: str
    version: str
    action: str  # "promote" | "reject"
    decided_by: str  # "policy:<policy file's version>" or "human:<user>"
    policy_version: str
    previous_champion: str | None
    metrics_compared: dict[str, Any]
    reasons: list[str]
    dag_run_id: str
    at: float
    policy_sha256: str = ""  # of the policy file the decision was made under
    details: dict[str, Any] = field(default_factory=dict)  # per-rule results, approval, links


def write_audit(settings: Settings, record: AuditRecord) -> str:
    """Write one audit record (never overwritten) and return its URI."""
    from ctrain import layout, storage

    uri = layout.audit_uri(settings.resolved_object_root, record.model, record.at, record.version, record.action)
    return storage.put_json(uri, asdict(record), settings)


def promote(client: MlflowClient, settings: Settings, version: str, expected_champion: str | None,
            record: AuditRecord) -> str:
    """Move ``champion`` to ``version`` if it still points at ``expected_champion`` (compare-and-set).

    The old champion keeps the ``previous`` alias, so a rollback is one alias move. Returns the audit URI.
    """
    name = settings.model_name
    current = alias_version(client, name, CHAMPION)
    if current == version:
        log.info("%s v%s is already champion; nothing to do", name, version)
        return write_audit(settings, record)
    if current != expected_champion:
        raise PromotionConflict(
            f"champion of {name} moved from v{expected_champion} to v{current} after evaluation; "
            "re-run evaluate/govern so the challenger is compared with the current champion."
        )
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, version)
    audit_uri = write_audit(settings, record)
    client.set_model_version_tag(name, version, "promotion_audit", audit_uri)
    client.set_model_version_tag(name, version, "promoted_by", record.decided_by)
    return audit_uri
