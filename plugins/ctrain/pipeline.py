"""The continuous-training steps, one function per DAG task, runnable without Airflow.

Each step takes the settings and the previous steps' JSON-serializable results (the XComs) and returns
its own. Each is idempotent for its inputs: the same snapshot, config and DAG give the same run key,
and a step that finds its output already committed returns it instead of doing the work again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ctrain import layout, lineage, params, registry, storage
from ctrain.errors import ConfigError, CtrainError, DataError, GovernanceRejected, TrainingFailed
from ctrain.launchers import TrainingJob, get_launcher
from trainer.contract import FAILURE_FILE, RESULT_FILE, TrainerResult, describe_exit

if TYPE_CHECKING:
    from collections.abc import Callable

    from ctrain.settings import Settings

log = logging.getLogger(__name__)



def build_dataset(settings: Settings, start: str | None = None, end: str | None = None) -> dict[str, Any]:
    """Feast point-in-time join -> immutable, content-addressed snapshot (reused when it exists).

    A bad window (``start`` after ``end``, no landed data in it, too short to split) is refused first,
    before ``feast apply`` or anything else is written."""
    from ctrain.featurestore import apply_feature_repo
    from ctrain.snapshot import build_snapshot, check_window

    check_window(settings, start, end)
    apply_feature_repo(settings)
    info = build_snapshot(settings, start=start, end=end)
    manifest = info.manifest
    log.info("dataset %s at %s (%s)", info.dataset_version, info.uri, "new" if info.created else "reused")
    return {
        "dataset_version": info.dataset_version,
        "uri": info.uri,
        "created": info.created,
        "feature_service": manifest["feature_service"],
        "feature_service_hash": manifest["feature_service_hash"],
        "rows": {split: meta["rows"] for split, meta in manifest["splits"].items()},
        "source_partitions": _partition_summary(manifest),
        "entity_window": manifest["entity_window"],
    }


def _partition_summary(manifest: dict[str, Any]) -> str:
    """'<table> 2026-01-01..2026-03-01 (60), <feature table> ...': which landed files made the snapshot.

    The full list with a sha256 per file stays in the manifest; this summary fits in an MLflow tag."""
    by_table: dict[str, list[str]] = {}
    for part in manifest["source_partitions"]["partitions"]:
        by_table.setdefault(part["table"], []).append(part["date"])
    return ", ".join(f"{t} {min(d)}..{max(d)} ({len(d)})" for t, d in sorted(by_table.items()))


def validate(settings: Settings, snapshot: dict[str, Any]) -> dict[str, Any]:
    """Great Expectations gate with the definition's thresholds; raises ``ValidationFailed`` (listing the failed expectations) on bad data."""
    from ctrain.validation import suite_config, validate_snapshot

    report_root = layout.reports_root(settings.resolved_object_root)
    reference = champion_snapshot_uri(settings)
    if reference:
        log.info("drift reference: the champion's training snapshot %s", reference)
    report = validate_snapshot(snapshot["uri"], report_root, suite_config(settings.definition),
                               reference_uri=reference, settings=settings)
    log.info("validation report: %s ; data docs: %s", report.report_uri, report.docs_uri)
    report.raise_for_failure()
    return {"success": report.success, "result_id": report.result_id, "report_uri": report.report_uri,
            "docs_uri": report.docs_uri, "drift_reference": reference}


def materialize_online(settings: Settings, snapshot: dict[str, Any]) -> dict[str, Any]:
    """Load validated feature rows into the online store (SQLite here, Redis in production) so serving
    reads the same features the model trained on. Incremental: Feast remembers what it loaded."""
    from datetime import UTC, datetime, timedelta

    from ctrain.featurestore import materialize_incremental

    end = datetime.fromisoformat(snapshot["entity_window"]["end"]).replace(tzinfo=UTC) + timedelta(days=1)
    return {"materialized_until": end.isoformat(), "intervals": materialize_incremental(settings, end=end)}


def champion_snapshot_uri(settings: Settings) -> str | None:
    """The snapshot the current champion was trained on (the drift reference), if there is a champion."""
    client = registry.get_client(settings)
    version = registry.alias_version(client, settings.model_name, registry.CHAMPION)
    if version is None:
        return None
    dataset_version = client.get_model_version(settings.model_name, version).tags.get("dataset_version")
    return layout.dataset_uri(settings.resolved_object_root, dataset_version) if dataset_version else None


@dataclass(frozen=True)
class RunIdentity:
    """What identifies one training run: the run key and what it is derived from."""

    run_key: str  # (dag, dataset version, config hash): names the MLflow run, checkpoints and output
    config_hash: str  # the trainer's semantic hash of the config with the overrides
    config_path: Path
    overrides: dict[str, str]  # the --set values the trainer gets, except checkpoint.uri and output.uri


def run_identity(settings: Settings, dag_id: str, snapshot: dict[str, Any],
                 overrides: dict[str, Any] | None = None) -> RunIdentity:
    """The run key of training ``snapshot`` with the pipeline's trainer config and a trigger's ``overrides``.

    The config part is the trainer's own semantic hash (:func:`ctrain.lineage.config_hash`): a comment or
    formatting edit of the YAML, or a change of a field that does not change what is trained, keeps the
    key (a rerun reuses or resumes); a real change gives a new one. Overrides outside the operator's
    limits and configs the trainer would refuse raise ConfigError here, before anything is created.
    """
    typed = dict(overrides or {})
    params.check_trainer_overrides(settings, typed)
    # JSON is YAML, which the trainer parses --set values as: 0.002, true, null, [128, 64] keep their type.
    as_set = {k: v if isinstance(v, str) else json.dumps(v) for k, v in typed.items()}
    config_path = Path(settings.trainer_config)
    if not config_path.is_file():
        raise ConfigError(f"trainer config {config_path} does not exist; fix training.config of pipeline "
                          f"{settings.pipeline!r} ({settings.pipelines_dir})")
    try:
        config_tree = yaml.safe_load(config_path.read_bytes()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"trainer config {config_path} (training.config of pipeline {settings.pipeline!r}) "
                          f"is not valid YAML: {exc}") from None
    # Pipeline-owned values come last: they win over anything the trigger sent.
    trainer_overrides = {**as_set, **params.pipeline_limits(settings, typed, config_tree),
                         "data.dataset_uri": snapshot["uri"]}
    config_hash = lineage.config_hash(config_path, trainer_overrides)
    return RunIdentity(lineage.run_key(dag_id, snapshot["dataset_version"], config_hash), config_hash,
                       config_path, trainer_overrides)


def train(settings: Settings, snapshot: dict[str, Any], validation: dict[str, Any], dag_id: str,
          dag_run_id: str, overrides: dict[str, Any] | None = None,
          sink: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Launch the trainer for (dag, dataset, config); a finished run for the same key is reused.

    Overrides outside the operator's limits are refused before anything is created (see
    :mod:`ctrain.params`); the limits also go to the trainer, which enforces them itself. The MLflow run
    created here is closed by :func:`registry.close_failed_run` on every failure path.
    """
    identity = run_identity(settings, dag_id, snapshot, overrides)
    key, config_hash, config_path = identity.run_key, identity.config_hash, identity.config_path
    root = settings.resolved_object_root
    output_uri, checkpoint_uri = layout.run_output_uri(root, key), layout.checkpoint_uri(root, key)

    client = registry.get_client(settings)
    run = registry.training_run_for(client, settings, key, tags={
        "dataset_version": snapshot["dataset_version"],
        "feature_service": snapshot["feature_service"],
        "feature_service_hash": snapshot["feature_service_hash"],
        "source_partitions": snapshot["source_partitions"],
        "gx_result_id": validation["result_id"],
        "gx_report_uri": validation["report_uri"],
        "gx_docs_uri": validation["docs_uri"],
        "dag_id": dag_id,
        "dag_run_id": dag_run_id,
        "git_sha": lineage.git_sha(),
        "config_hash": config_hash,
    })
    result = _read_result(output_uri, RESULT_FILE, settings)
    if run.status == "FINISHED" and result is not None and result.succeeded:
        log.info("run key %s already trained (MLflow run %s); reusing its result", key, run.run_id)
        return {**result.to_dict(), "run_key": key, "reused": True}

    job = TrainingJob(
        config_path=str(config_path),
        overrides={**identity.overrides, "checkpoint.uri": checkpoint_uri, "output.uri": output_uri},
        env=_trainer_env(settings, run.run_id),
        nproc_per_node=settings.nproc_per_node,
    )
    started = time.monotonic()
    try:
        result = _launch(settings, job, output_uri, sink)
    except BaseException as exc:  # also a kill of this task: nothing leaves the run RUNNING
        status = registry.close_failed_run(client, run.run_id, exc)
        log.info("MLflow run %s closed as %s", run.run_id, status)
        raise
    primary = settings.definition.primary_test_metric
    log.info("training took %.1fs; %s=%s", time.monotonic() - started, primary,
             result.metrics.get(primary, "not logged by the trainer"))
    return {**result.to_dict(), "run_key": key, "reused": False}


def _trainer_env(settings: Settings, run_id: str) -> dict[str, str]:
    """The settings the trainer's env contract reads (docs/contracts.md), from these settings: a value
    that came from ``.env`` is not in this process's environment for the launcher to pass through."""
    env = {"MLFLOW_TRACKING_URI": settings.resolved_tracking_uri, "MLFLOW_RUN_ID": run_id}
    if settings.s3_endpoint_url:
        env["CTRAIN_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env


def _launch(settings: Settings, job: TrainingJob, output_uri: str,
            sink: Callable[[str], None] | None) -> TrainerResult:
    """Run the trainer and return its result; TrainingFailed carries the trainer's own exit code."""
    # An earlier attempt's record must not speak for this one.
    storage.remove(storage.join(output_uri, FAILURE_FILE), settings)
    try:
        get_launcher(settings).run(job, sink)
    except TrainingFailed as exc:
        # torchrun exits 1 whenever a worker fails; the trainer's own code (65/70/75) is in failure.json
        # (result.json may keep an earlier success, which a failed rerun never replaces).
        failed = _read_result(output_uri, FAILURE_FILE, settings)
        if failed is not None and not failed.succeeded and failed.exit_code:
            code = failed.exit_code
            raise TrainingFailed(code, f"trainer failed with exit code {code} ({describe_exit(code)}): "
                                       f"{failed.error}") from exc
        raise
    result = _read_result(output_uri, RESULT_FILE, settings)
    if result is None:
        raise CtrainError(f"trainer exited 0 but wrote no {output_uri}/{RESULT_FILE}; see the task log above")
    return result


def _read_result(output_uri: str, name: str = RESULT_FILE, settings: Settings | None = None) -> TrainerResult | None:
    """The trainer's record ``name`` under ``output_uri`` (None when absent); DataError if it is not one."""
    uri = storage.join(output_uri, name)
    try:
        data = storage.read_bytes(uri, settings)
    except FileNotFoundError:
        return None
    try:
        return TrainerResult.from_json(data)
    except ValueError as exc:
        raise DataError(f"{uri} is not a JSON object of the trainer's result schema, so not a trainer record "
                        f"({str(exc).splitlines()[0]}); delete it and rerun the task") from None


def evaluate(settings: Settings, training: dict[str, Any], snapshot: dict[str, Any]) -> dict[str, Any]:
    """Score the new model and the champion on the same test split, from their MLflow models.

    Every metric of the definition is computed from the exported model; its primary metric must
    reproduce what the trainer logged for the same split (when the trainer logs that metric), else the
    export does not hold the trained weights. Both models' per-row outputs, the labels and the policy's
    slice columns go to one parquet file (:func:`ctrain.layout.predictions_uri`) for govern's paired
    intervals; the model's artifact bytes and, when the policy limits it, its p95 CPU latency are measured
    here, where the model is loaded."""
    from ctrain import evaluation as ev
    from ctrain.governance import load_policy

    definition = settings.definition
    policy = load_policy(definition, settings.pipelines_dir).policy
    primary = definition.primary_test_metric
    frame, manifest = ev.read_split(snapshot["uri"], "test", settings)
    labels = frame[manifest["label_column"]].to_numpy()
    missing = sorted({s.column for s in policy.slices} - set(frame.columns))
    if missing:
        raise ConfigError(f"policy slices name column(s) {', '.join(missing)} that the test split lacks "
                          f"(it has {', '.join(frame.columns)}); fix slices[].column of the policy")
    model = ev.load_model(training["model_uri"], settings)
    outputs = ev.predict(model, frame, manifest)
    challenger = ev.scores(definition, labels, outputs)
    logged = training["metrics"].get(primary)
    if logged is not None and abs(challenger[primary] - logged) > _REPRODUCTION_TOLERANCE * max(1.0, abs(logged)):
        raise CtrainError(
            f"exported model scores {primary}={challenger[primary]:.6f} but training logged "
            f"{logged:.6f}: the MLflow model does not reproduce the trained weights ({training['model_uri']})"
        )
    latency = policy.latency
    p95 = ev.latency_p95_ms(model, frame, manifest, latency.batch_rows, latency.batches) if latency else None
    client = registry.get_client(settings)
    champion_version = registry.alias_version(client, settings.model_name, registry.CHAMPION)
    champion, champion_outputs = None, None
    if champion_version is not None:
        champion_model = ev.load_model(f"models:/{settings.model_name}/{champion_version}", settings)
        if ev.input_names(champion_model) == manifest["feature_columns"]:
            champion_outputs = ev.predict(champion_model, frame, manifest)
            champion = ev.scores(definition, labels, champion_outputs)
        else:
            # A champion trained on another feature set cannot be scored on this snapshot; the policy then
            # judges the challenger without the comparison, and the decision says so.
            log.warning("champion v%s takes other inputs than this snapshot's features; not compared",
                        champion_version)
    table = ev.predictions_table(labels, outputs, champion_outputs,
                                 {c: frame[c].to_numpy() for c in dict.fromkeys(s.column for s in policy.slices)})
    predictions_uri = layout.predictions_uri(settings.resolved_object_root, training["run_key"],
                                             champion_version if champion is not None else None)
    storage.put_bytes(predictions_uri, _parquet_bytes(table), settings)
    run_id = training["mlflow_run_id"]
    for name in definition.test_metrics:
        client.log_metric(run_id, f"eval_{name}", challenger[name])
        if champion is not None:
            client.log_metric(run_id, f"champion_{name}", champion[name])
    size = ev.model_bytes(training["model_uri"], settings)
    client.log_metric(run_id, "eval_model_bytes", size)
    if p95 is not None:
        client.log_metric(run_id, "eval_latency_p95_ms", p95)
    return {"challenger": challenger, "champion": champion, "champion_version": champion_version,
            "predictions_uri": predictions_uri, "model_bytes": size, "latency_p95_ms": p95,
            "mlflow_run_id": run_id, "run_key": training["run_key"], "snapshot_uri": snapshot["uri"]}


def _parquet_bytes(frame: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


# Relative (to the metric, at least 1) gap allowed between the exported model's primary metric and the
# trainer's: float32 vs float64 accumulation, not a different model.
_REPRODUCTION_TOLERANCE = 1e-4


def register(settings: Settings, training: dict[str, Any], snapshot: dict[str, Any],
             validation: dict[str, Any], dag_run_id: str) -> dict[str, Any]:
    """Model version with lineage tags, alias ``challenger``."""
    lineage_tags = {
        "dataset_version": snapshot["dataset_version"],
        "feature_service": snapshot["feature_service"],
        "feature_service_hash": snapshot["feature_service_hash"],
        "source_partitions": snapshot["source_partitions"],
        "gx_result_id": validation["result_id"],
        "git_sha": lineage.git_sha(),
        "image": _image_reference(settings),
        "config_hash": training["config_hash"],
        "seed": str(training["seed"]),
        "dag_run_id": dag_run_id,
        "mlflow_run_id": training["mlflow_run_id"],
        "checkpoint": training["checkpoint"],
        "run_key": training["run_key"],
    }
    package = training.get("model_package")  # a user model's distribution; absent for trainer.model's
    if package:
        lineage_tags["model_package"] = package["name"]
        lineage_tags["model_package_version"] = package["version"]
    client = registry.get_client(settings)
    version = registry.register_challenger(client, settings, training["mlflow_run_id"], training["model_uri"],
                                           lineage_tags)
    return {"model": settings.model_name, "version": version, "alias": registry.CHALLENGER}


def _image_reference(settings: Settings) -> str:
    """The training image as lineage: ``local`` for the local launcher; for docker the image's content id
    (``<tag>@sha256:...``) from the engine that ran it; for kubernetes the configured reference, which the
    policy's lineage rule wants pinned by digest."""
    launcher = settings.resolved_launcher
    if launcher == "local":
        return "local"
    image = settings.training_image
    if launcher == "docker" and "@sha256:" not in image:
        import docker

        client = docker.from_env()
        try:
            return f"{image}@{client.images.get(image).id}"
        finally:
            client.close()
    return image


def govern(settings: Settings, evaluation: dict[str, Any], primary_metric_floor: float | None = None,
           dag_run_id: str | None = None) -> dict[str, Any]:
    """Apply the pipeline's policy file (``primary_metric_floor`` replaces the primary metric's floor when
    given), record the decision, approval or rejection alike, on the challenger's version (tags), its run
    (tags + ``governance/decision.json``), the audit trail and the model card; then raise
    ``GovernanceRejected`` on a 'no', so nothing is promoted. The audit record names ``dag_run_id``, the run
    that decided (default: the one that registered the version, which a rerun reuses)."""
    from ctrain import governance, modelcard

    definition = settings.definition
    loaded = governance.load_policy(definition, settings.pipelines_dir)
    client = registry.get_client(settings)
    run_id = evaluation.get("mlflow_run_id")
    version = registry.version_of_run(client, settings.model_name, run_id) if run_id else None
    tags = client.get_model_version(settings.model_name, version).tags if version else {}
    predictions = None
    if evaluation.get("predictions_uri"):
        predictions = _read_parquet(evaluation["predictions_uri"], settings)
    evidence = governance.Evidence(
        challenger=evaluation["challenger"], champion=evaluation["champion"], predictions=predictions,
        lineage=tags, validation_success=_validation_success(client, run_id, settings),
        model_bytes=evaluation.get("model_bytes"), latency_p95_ms=evaluation.get("latency_p95_ms"))
    decision = governance.decide(loaded, definition, evidence, primary_floor=primary_metric_floor)
    for reason in decision.reasons:
        log.info("governance: %s", reason)
    result = {"approved": decision.approved, "policy_version": decision.policy_version,
              "policy_sha256": decision.policy_sha256, "reasons": decision.reasons,
              "metrics_compared": decision.metrics_compared, "champion_version": evaluation.get("champion_version"),
              "rules": [r.to_dict() for r in decision.rules],
              "grey_zone": decision.grey_zone,
              "metric_intervals": governance.metric_intervals(loaded, definition, predictions),
              "approval": approval_needed(definition.governance.approval, evaluation, grey_zone=decision.grey_zone)}
    if version is not None:
        result["audit_uri"] = _record_decision(client, settings, version, run_id, tags, evaluation, result,
                                               dag_run_id or tags.get("dag_run_id", ""))
        modelcard.publish(settings, settings.model_name, version)
    if not decision.approved:
        raise GovernanceRejected("challenger not promoted: " + "; ".join(
            r for r, rule in zip(decision.reasons, decision.rules, strict=True) if not rule.passed))
    return result


def _read_parquet(uri: str, settings: Settings) -> Any:
    import io

    import pandas as pd

    return pd.read_parquet(io.BytesIO(storage.read_bytes(uri, settings)))


def _validation_success(client: Any, run_id: str | None, settings: Settings) -> bool | None:
    """The GX result of the run's training snapshot, read from the report the run links (``gx_report_uri``)."""
    if not run_id:
        return None
    report_uri = client.get_run(run_id).data.tags.get("gx_report_uri")
    report = storage.read_json(report_uri, settings) if report_uri else None
    return bool(report.get("success")) if isinstance(report, dict) and "success" in report else None


def _record_decision(client: Any, settings: Settings, version: str, run_id: str, tags: dict[str, str],
                     evaluation: dict[str, Any], result: dict[str, Any], dag_run_id: str) -> str:
    """The decision on the version's tags, the run (tags + ``governance/decision.json``) and the audit trail."""
    name, approved = settings.model_name, result["approved"]
    failed = [r["name"] for r in result["rules"] if not r["passed"]]
    summary = (f"approved under {result['policy_version']}: {len(result['rules'])} rules passed" if approved else
               f"rejected under {result['policy_version']}: failed {', '.join(failed)}")
    record = registry.AuditRecord(
        model=name, version=version, action="approve" if approved else "reject",
        decided_by=f"policy:{result['policy_version']}", policy_version=result["policy_version"],
        previous_champion=evaluation.get("champion_version"), metrics_compared=result["metrics_compared"],
        reasons=result["reasons"], dag_run_id=dag_run_id, at=time.time(),
        policy_sha256=result["policy_sha256"], details={"rules": result["rules"], "grey_zone": result["grey_zone"]})
    audit_uri = registry.write_audit(settings, record)
    decision_tags = {"governance.decision": record.action, "governance.policy_version": result["policy_version"],
                     "governance.policy_sha256": result["policy_sha256"], "governance.summary": summary,
                     "governance.grey_zone": str(result["grey_zone"]).lower(), "governance.audit": audit_uri}
    for key, value in decision_tags.items():
        client.set_model_version_tag(name, version, key, value)
        client.set_tag(run_id, key, value)
    client.log_text(run_id, json.dumps({**result, "model": name, "version": version}, indent=2, default=str),
                    DECISION_ARTIFACT)
    return audit_uri


DECISION_ARTIFACT = "governance/decision.json"


def approval_needed(approval: Any, evaluation: dict[str, Any], grey_zone: bool) -> dict[str, Any]:
    """The govern result's ``approval`` entry (the approval task's input): must a person approve, who, how
    long to wait. ``approval`` is the definition's ``governance.approval``."""
    required = {"never": False, "always": True, "grey_zone": grey_zone,
                "on_promotion": evaluation.get("champion_version") is not None}[approval.required]
    return {"required": required, "rule": approval.required, "approvers": list(approval.approvers),
            "timeout_s": approval.timeout_s}


def promote(settings: Settings, registration: dict[str, Any], evaluation: dict[str, Any],
            decision: dict[str, Any], dag_run_id: str) -> dict[str, Any]:
    """Move ``champion`` to the challenger (compare-and-set), keep the old one as ``previous``, audit it."""
    client = registry.get_client(settings)
    record = registry.AuditRecord(
        model=registration["model"], version=registration["version"], action="promote",
        decided_by=f"policy:{decision['policy_version']}", policy_version=decision["policy_version"],
        previous_champion=evaluation["champion_version"], metrics_compared=decision["metrics_compared"],
        reasons=decision["reasons"], dag_run_id=dag_run_id, at=time.time(),
        policy_sha256=decision.get("policy_sha256", ""),
    )
    audit_uri = registry.promote(client, settings, registration["version"], evaluation["champion_version"], record)
    return {"model": registration["model"], "version": registration["version"], "alias": registry.CHAMPION,
            "previous": evaluation["champion_version"], "audit_uri": audit_uri}


def retire(settings: Settings, promotion: dict[str, Any] | None, dag_run_id: str) -> dict[str, Any]:
    """Archive the versions older than the definition's newest ``governance.keep_versions`` (never an alias
    holder): tagged ``ctrain.retired``, other aliases removed, artifacts kept, each audited."""
    keep = settings.definition.governance.keep_versions
    client = registry.get_client(settings)
    retired = registry.retire(client, settings, keep, reason=f"older than the newest {keep} versions",
                              decided_by="pipeline", dag_run_id=dag_run_id)
    return {"model": settings.model_name, "keep": keep, "retired": retired}


def rollback(settings: Settings, to: str, reason: str, decided_by: str, dag_run_id: str = "") -> dict[str, Any]:
    """Champion back to ``to`` (``previous`` or a version) through the locked, audited move."""
    return registry.rollback(registry.get_client(settings), settings, to, reason, decided_by, dag_run_id)
