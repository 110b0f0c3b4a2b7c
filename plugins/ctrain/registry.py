"""MLflow side of the pipeline: the training run per run key, model versions, aliases and their audit trail.

One registered model per pipeline (the definition's ``model.name``) with aliases ``challenger``, ``champion`` and
``previous``. Every version carries lineage tags. Every alias move (register, promote, rollback, retire)
takes the model's promotion lock (:mod:`ctrain.locks`), compares the aliases with what the audit chain
(:mod:`ctrain.audit`) says, appends its record to the chain and only then moves the aliases: the record is
the commit point. A move that dies after its record and before its aliases is completed by the next move
(the aliases still equal the state before the head record, so they are rolled forward to it); any other
difference between MLflow and the chain is a move done outside ctrain and gets an ``external_move`` record
and a warning. All calls are idempotent for their inputs, so a retried task never creates a second run,
version or move for the same run key.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ctrain import audit, locks
from ctrain.errors import ConfigError, CtrainError, ServiceUnavailable, is_terminal

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from mlflow import MlflowClient

    from ctrain.settings import Settings

log = logging.getLogger(__name__)

RUN_KEY_TAG = "ctrain.run_key"
FAILURE_TAG = "last_failure"  # same tag as the trainer's: one place to read why a run failed
CHAMPION, CHALLENGER, PREVIOUS = audit.ALIASES[0], audit.ALIASES[1], audit.ALIASES[2]
RETIRED_TAG = "ctrain.retired"  # when a version was retired; ctrain.retired_reason says why


class PromotionConflict(CtrainError):
    """The champion changed between evaluation and promotion (compare-and-set failed), or another mover
    appended its audit record first. Nothing was moved or recorded by the loser."""


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
    location: str | None = settings.resolved_artifact_root
    if location.startswith("mlflow-artifacts:"):
        # Artifacts proxied by the server: it names the location mlflow-artifacts:/<experiment id>, the
        # layout its basic-auth judges artifact writes by (a path naming no experiment gets the default
        # permission, READ, so a non-admin service account could not log a single artifact).
        location = None
    return client.create_experiment(settings.experiment_name, artifact_location=location)


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
    record = AuditRecord(model=name, version=str(version), action="register", decided_by="pipeline",
                         policy_version="", previous_champion=None, metrics_compared={},
                         reasons=[f"registered from MLflow run {run_id}"],
                         dag_run_id=str(lineage.get("dag_run_id", "")), at=time.time())
    _move(client, settings, record, lambda aliases: {**aliases, CHALLENGER: str(version)})
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
    action: str  # approve | reject | human_* | approval_timeout | promote | rollback | retire | register | external_move
    decided_by: str  # "policy:<policy file's version>" or "human:<user>"
    policy_version: str
    previous_champion: str | None
    metrics_compared: dict[str, Any]
    reasons: list[str]
    dag_run_id: str
    at: float
    policy_sha256: str = ""  # of the policy file the decision was made under
    details: dict[str, Any] = field(default_factory=dict)  # per-rule results, approval, links


_UNSET: Any = object()


def write_audit(settings: Settings, record: AuditRecord) -> str:
    """Append a decision that moves no alias (approve, reject, human_*, approval_timeout) to the model's
    audit chain and return its URI. Takes no lock: a concurrent append only makes this one re-read and retry."""
    client = get_client(settings)
    for _ in range(_APPEND_ATTEMPTS):
        chain = audit.read_chain(settings, record.model)
        audit.check_head(client, record.model, chain)
        try:
            entry = audit.append(settings, record.model, asdict(record), audit.state(chain), chain)
        except audit.AuditConflict:
            continue
        audit.anchor(client, record.model, entry)
        return entry.uri
    raise ServiceUnavailable(f"audit chain of {record.model}: {_APPEND_ATTEMPTS} appends in a row lost to other "
                             "writers; retry")


_APPEND_ATTEMPTS = 5


def current_aliases(client: MlflowClient, name: str) -> audit.Aliases:
    """Who holds champion/challenger/previous in MLflow now (None each when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_registered_model(name).aliases or {}
    except MlflowException:
        return audit.no_aliases()
    return {alias: (str(held[alias]) if alias in held else None) for alias in audit.ALIASES}


def reconcile(client: MlflowClient, settings: Settings, name: str) -> list[audit.Entry]:
    """Bring MLflow and the chain into agreement before a move, under the lock; returns the chain.

    Aliases equal to the chain: nothing to do. Aliases equal to the state *before* the head record: the
    head's move was committed but not applied (a crash between the two), so it is applied now. Anything
    else was moved outside ctrain: an ``external_move`` record with what moved, and a warning. A broken
    chain (an edited or deleted record, a missing tail) refuses every move: DataError."""
    chain = audit.read_chain(settings, name)
    audit.check(settings, client, name, chain)
    recorded, actual = audit.state(chain), current_aliases(client, name)
    if actual == recorded:
        return chain
    before = chain[-2].aliases if len(chain) > 1 else audit.no_aliases()
    if chain and actual == before:
        log.warning("completing audit record %s of %s: its alias move was not applied", chain[-1].seq, name)
        _apply(client, name, actual, recorded)
        return chain
    changes = {a: {"from": recorded[a], "to": actual[a]} for a in audit.ALIASES if recorded[a] != actual[a]}
    now = time.time()
    record = AuditRecord(model=name, version=str(actual[CHAMPION] or ""), action="external_move",
                         decided_by="outside ctrain", policy_version="", previous_champion=recorded[CHAMPION],
                         metrics_compared={}, reasons=["aliases differ from the audit chain's head"],
                         dag_run_id="", at=now, details={"changes": changes, "detected_at": now})
    entry = audit.append(settings, name, asdict(record), actual, chain)
    audit.anchor(client, name, entry)
    audit.alert_external_move(name, changes, entry.uri)
    return [*chain, entry]


def _apply(client: MlflowClient, name: str, old: audit.Aliases, new: audit.Aliases) -> None:
    """Move MLflow's aliases from ``old`` to ``new`` (previous before champion: a reader never sees the old
    champion held by nobody)."""
    for alias in (PREVIOUS, CHALLENGER, CHAMPION):
        if new[alias] == old[alias]:
            continue
        if new[alias] is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, new[alias])


def _move(client: MlflowClient, settings: Settings, record: AuditRecord,
          change: Callable[[audit.Aliases], audit.Aliases], expected_champion: Any = _UNSET) -> audit.Entry | None:
    """The one locked, audited alias move. ``change`` maps the current aliases to the new ones; with
    ``expected_champion`` the move is compare-and-set on ``champion``. Returns the record written or, when
    the aliases already are the new ones (a retried task), the newest record of the same action and
    version (None if the chain has none)."""
    name = settings.model_name
    if record.model != name:
        raise ConfigError(f"audit record for model {record.model!r} passed to a move of {name!r} "
                          f"(pipeline {settings.pipeline!r}); the record names the model it moves")
    with locks.promotion_lock(settings, name) as held:
        log.info("holding %s", held)
        chain = reconcile(client, settings, name)
        aliases = audit.state(chain)
        new = change(dict(aliases))
        if new == aliases:  # a retried task whose move is done (or was completed by reconcile)
            return _last(chain, record)
        if expected_champion is not _UNSET and aliases[CHAMPION] != expected_champion:
            raise PromotionConflict(
                f"champion of {name} is now {_v(aliases[CHAMPION])}, but this {record.action} was decided when "
                f"it was {_v(expected_champion)}; re-run evaluate/govern so the challenger is compared with the "
                "current champion. Nothing was moved."
            )
        try:
            entry = audit.append(settings, name, asdict(record), new, chain)
        except audit.AuditConflict as exc:
            raise PromotionConflict(f"{record.action} of {name} v{record.version} lost the race: {exc}. "
                                    "Nothing was moved.") from None
        _apply(client, name, aliases, new)
        audit.anchor(client, name, entry)
        return entry


def _v(version: str | None) -> str:
    return f"v{version}" if version is not None else "unset"


def _last(chain: list[audit.Entry], record: AuditRecord) -> audit.Entry | None:
    """The newest record of ``record``'s action on ``record``'s version."""
    same = [e for e in chain if e.doc.get("action") == record.action and e.doc.get("version") == record.version]
    return same[-1] if same else None


def promote(client: MlflowClient, settings: Settings, version: str, expected_champion: str | None,
            record: AuditRecord) -> str:
    """Move ``champion`` to ``version`` if it still points at ``expected_champion`` (compare-and-set, under
    the promotion lock, audited). The old champion keeps ``previous``. Returns the audit record's URI."""
    name = settings.model_name

    def change(aliases: audit.Aliases) -> audit.Aliases:
        if aliases[CHAMPION] == version:
            return aliases
        return {**aliases, CHAMPION: version, PREVIOUS: aliases[CHAMPION] or aliases[PREVIOUS]}

    entry = _move(client, settings, record, change, expected_champion)
    if entry is None:  # champion since before the chain began
        log.info("%s v%s is already champion; nothing to do", name, version)
        return ""
    client.set_model_version_tag(name, version, "promotion_audit", entry.uri)
    client.set_model_version_tag(name, version, "promoted_by", record.decided_by)
    return entry.uri


def rollback(client: MlflowClient, settings: Settings, to: str, reason: str, decided_by: str,
             dag_run_id: str = "") -> dict[str, Any]:
    """Make ``to`` (``previous`` or a version number) champion again through the same locked, audited,
    compare-and-set move as a promotion; the champion it replaces becomes ``previous``."""
    name = settings.model_name
    if not reason.strip():
        raise ConfigError("rollback needs a reason (--reason / Param reason): it goes into the audit record")
    champion = alias_version(client, name, CHAMPION)
    target = alias_version(client, name, PREVIOUS) if to == PREVIOUS else to.removeprefix("v")
    if target is None:
        raise ConfigError(f"{name} has no {PREVIOUS} version to roll back to; pass --to <version>")
    if not target.isdigit() or not _version_exists(client, name, target):
        raise ConfigError(f"rollback --to {to!r}: {name} has no version {target}; pass 'previous' or one of "
                          f"{', '.join(sorted(_versions(client, name), key=int)) or 'none'}")
    if target == champion:
        raise ConfigError(f"{name} v{target} already is champion; nothing to roll back")
    record = AuditRecord(model=name, version=target, action="rollback", decided_by=decided_by,
                         policy_version="", previous_champion=champion, metrics_compared={},
                         reasons=[reason], dag_run_id=dag_run_id, at=time.time(), details={"to": to})
    entry = _move(client, settings, record, lambda a: {**a, CHAMPION: target, PREVIOUS: a[CHAMPION]}, champion)
    if entry is None:  # cannot happen: target != champion, and the chain agrees with MLflow under the lock
        raise CtrainError(f"rollback of {name} to v{target} wrote no audit record")
    client.set_model_version_tag(name, target, "rollback_audit", entry.uri)
    return {"model": name, "champion": target, "previous": champion, "audit_uri": entry.uri}


def _versions(client: MlflowClient, name: str) -> dict[str, Any]:
    return {str(mv.version): mv for mv in client.search_model_versions(f"name = '{name}'")}


def _version_exists(client: MlflowClient, name: str, version: str) -> bool:
    return version in _versions(client, name)


def retire(client: MlflowClient, settings: Settings, keep: int, reason: str, decided_by: str,
           dag_run_id: str = "") -> list[str]:
    """Archive every version older than the newest ``keep``, except the ones holding champion, previous or
    challenger: tag ``ctrain.retired`` (when) and ``ctrain.retired_reason``, any other alias removed,
    artifacts kept. One audited record per version; returns the versions retired now."""
    if keep < 1:
        raise ConfigError(f"retire --keep {keep}: keep at least 1 version (governance.keep_versions)")
    name = settings.model_name
    retired = []
    with locks.promotion_lock(settings, name):
        chain = reconcile(client, settings, name)
        held = {v for v in audit.state(chain).values() if v is not None}
        versions = _versions(client, name)
        by_version: dict[str, list[str]] = {}  # search results carry no aliases; the registered model does
        for alias, held_by in (client.get_registered_model(name).aliases or {}).items():
            by_version.setdefault(str(held_by), []).append(alias)
        old = sorted(versions, key=int, reverse=True)[keep:]
        for version in sorted((v for v in old if v not in held and RETIRED_TAG not in versions[v].tags), key=int):
            others = sorted(set(by_version.get(version, [])) - set(audit.ALIASES))
            now = time.time()
            record = AuditRecord(model=name, version=version, action="retire", decided_by=decided_by,
                                 policy_version="", previous_champion=None, metrics_compared={},
                                 reasons=[reason], dag_run_id=dag_run_id, at=now,
                                 details={"keep": keep, "aliases_removed": others})
            entry = audit.append(settings, name, asdict(record), audit.state(chain), chain)
            chain.append(entry)
            for alias in others:
                client.delete_registered_model_alias(name, alias)
            client.set_model_version_tag(name, version, RETIRED_TAG, _iso(now))
            client.set_model_version_tag(name, version, "ctrain.retired_reason", reason)
            audit.anchor(client, name, entry)
            retired.append(version)
    log.info("retired %s of %s (kept the newest %s and every alias holder)", retired or "nothing", name, keep)
    return retired


def _iso(at: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def check_external_moves(client: MlflowClient, settings: Settings) -> list[audit.Entry]:
    """:func:`reconcile` on its own (``ctrain audit verify``): records and reports moves done outside
    ctrain; returns the chain."""
    with locks.promotion_lock(settings, settings.model_name):
        return reconcile(client, settings, settings.model_name)
