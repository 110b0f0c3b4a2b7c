"""Promotion policy as code: may this challenger replace the champion?

A policy is a versioned YAML file per pipeline (``governance.policy`` of the definition, relative to the
definition file), validated at load by :class:`Policy`. Its sha256 (of the file bytes) and ``version`` go
with every decision. It is made of small rules, each a function returning a :class:`RuleResult` (passed,
reason, numbers):

- ``floor:<metric>``: a floor (higher is better) or ceiling (lower) on a test metric;
- ``non_inferiority``: the paired interval (bootstrap, or DeLong for the ROC AUC) of challenger - champion
  on the same test rows must lie above ``-margin`` (in the metric's direction); optionally above 0
  (``require_superiority``), so a challenger better by noise alone is not "better";
- ``slice:<column>``: the metric on named segments of the test split (categories, or numeric bins), with a
  floor and a maximum drop against the champion on the same segment;
- ``validation``: the training snapshot's GX result succeeded;
- ``lineage``: the model version carries every lineage tag;
- ``model_size``, ``latency``: bytes of the logged model, p95 milliseconds per batch through the model.

Inputs are the evaluate step's results (metrics, the per-row predictions file, size and latency) and the
version's lineage tags; :func:`decide` runs every rule and never stops at the first "no", so the record says
everything that was wrong. The generic code names no metric: which ones exist and their direction come
from ``ctrain.definition.TASK_METRICS``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctrain.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from ctrain.definition import PipelineDefinition

# Lineage tags every version must carry (docs/contracts.md, "Registry").
LINEAGE_TAGS = ("dataset_version", "feature_service", "feature_service_hash", "gx_result_id", "git_sha", "image",
                "config_hash", "seed", "dag_run_id", "mlflow_run_id", "checkpoint")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NonInferiority(_Section):
    """The challenger against the champion on the same test rows, with uncertainty."""

    metric: str | None = Field(default=None, description="Test metric compared (null: the definition's primary).")
    margin: float = Field(default=0.0, ge=0, description="How much worse than the champion is still acceptable: "
                          "pass when the interval's bound in the bad direction is better than -margin.")
    method: Literal["auto", "bootstrap", "delong"] = Field(
        default="auto", description="Interval of the difference: paired bootstrap, DeLong (ROC AUC only), or "
        "auto (DeLong for ROC AUC, else the bootstrap).")
    samples: int = Field(default=1000, ge=100, le=100_000, description="Bootstrap resamples (B).")
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="Two-sided interval level is 1 - alpha.")
    seed: int = Field(default=0, description="Seed of the bootstrap's resampling (the interval is reproducible).")
    require_superiority: bool = Field(
        default=False, description="Also require the interval to exclude 0 on the good side (significantly "
        "better); false: non-inferior is enough.")
    grey_width: float = Field(default=0.0, ge=0, description="A pass whose bound is within this of the limit "
                              "is a grey zone (`governance.approval.required: grey_zone` asks a person).")


class Slice(_Section):
    """Segments of the test split by one column, each judged on its own."""

    column: str = Field(description="A column of the test split (an event feature, entity or id column).")
    bins: list[float] | None = Field(default=None, min_length=2, description="Numeric column: ascending bin "
                                     "edges ([a, b) per bin); null: one segment per distinct value.")
    metric: str | None = Field(default=None, description="Test metric per segment (null: the primary).")
    floor: float | None = Field(default=None, description="Each segment's metric must be at least (higher) / "
                                "at most (lower) this; null: no floor.")
    max_drop: float | None = Field(default=None, ge=0, description="How much worse than the champion on the "
                                   "same segment is acceptable; null: not compared.")
    min_rows: int = Field(default=100, ge=1, description="Segments with fewer test rows are reported, not judged.")

    @model_validator(mode="after")
    def _ascending(self) -> Slice:
        if self.bins is not None and any(a >= b for a, b in zip(self.bins, self.bins[1:], strict=False)):
            raise ValueError(f"bins {self.bins} must be strictly ascending")
        return self


class Latency(_Section):
    max_p95_ms: float = Field(gt=0, description="Ceiling of the p95 CPU latency of one batch through the model.")
    batch_rows: int = Field(default=1000, ge=1, description="Rows per batch (N).")
    batches: int = Field(default=20, ge=5, le=1000, description="Batches timed (K).")


class Policy(_Section):
    """Root of a policy file (`pipelines/policies/<pipeline>.yaml`)."""

    version: str = Field(description="Recorded with every decision (with the file's sha256); bump it on a change.")
    floors: dict[str, float] = Field(
        default_factory=dict, description="Test metric -> the value it must be at least (higher is better) or "
        "at most (lower); the trigger Param `primary_metric_floor` replaces the primary's.")
    non_inferiority: NonInferiority | None = Field(default=None, description="Against the champion, with "
                                                   "uncertainty (null: not compared).")
    slices: list[Slice] = Field(default_factory=list, description="Per-segment floors and drops.")
    require_validation: bool = Field(default=True, description="The training snapshot's GX result must be a success.")
    require_lineage: bool = Field(default=True, description="The version must carry every lineage tag "
                                  "(image: the image digest, or `local`).")
    max_model_bytes: int | None = Field(default=None, ge=1, description="Ceiling of the logged model's artifact bytes.")
    latency: Latency | None = Field(default=None, description="CPU latency limit (null: not measured).")

    def check_against(self, definition: PipelineDefinition, source: str) -> None:
        """ConfigError naming ``source`` if a rule names a metric the definition's task does not compute."""
        from ctrain.definition import TASK_METRICS
        from ctrain.uncertainty import BOOTSTRAP_METRICS, DELONG_METRICS

        known = TASK_METRICS[definition.task.type]
        named = [*self.floors, *(s.metric for s in self.slices if s.metric)]
        ni = self.non_inferiority
        if ni and ni.metric:
            named.append(ni.metric)
        bad = [m for m in named if m not in known]
        if bad:
            raise ConfigError(f"policy {source}: metric(s) {', '.join(bad)} not computed for task "
                              f"{definition.task.type!r}; known: {', '.join(known)}")
        if ni:
            metric = ni.metric or definition.metrics.primary
            if ni.method == "delong" and metric not in DELONG_METRICS:
                raise ConfigError(f"policy {source}: non_inferiority.method delong applies to "
                                  f"{', '.join(DELONG_METRICS)}, not {metric}; use bootstrap")
            if metric not in BOOTSTRAP_METRICS:
                raise ConfigError(f"policy {source}: non_inferiority.metric {metric} has no paired interval; "
                                  f"use one of {', '.join(sorted(BOOTSTRAP_METRICS & set(known)))}")


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy with what identifies it: its file and the sha256 of its bytes."""

    policy: Policy
    path: Path
    sha256: str


def policy_path(definition: PipelineDefinition, pipelines_dir: Path | str) -> Path:
    """The definition's policy file: ``governance.policy``, relative to the definition file's directory."""
    path = Path(definition.governance.policy)
    return path if path.is_absolute() else Path(pipelines_dir) / path


def load_policy(definition: PipelineDefinition, pipelines_dir: Path | str) -> LoadedPolicy:
    """Read and validate the definition's policy; ConfigError names the file and every bad key."""
    path = policy_path(definition, pipelines_dir)
    source = f"{path} (governance.policy of pipeline {definition.name!r})"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"policy {source}: cannot read ({exc.strerror}); create it or fix governance.policy") from None
    try:
        tree = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy {source}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"policy {source}: top level must be a mapping")
    try:
        policy = Policy.model_validate(tree)
    except ValidationError as exc:
        lines = [f"policy {source} is invalid:"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            lines.append(f"  {loc}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("\n".join(lines)) from None
    policy.check_against(definition, source)
    return LoadedPolicy(policy, path, hashlib.sha256(data).hexdigest())


# ---- decisions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleResult:
    name: str
    passed: bool
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    grey_zone: bool = False  # passed, but by less than the policy's grey width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    approved: bool
    policy_version: str
    reasons: list[str] = field(default_factory=list)
    metrics_compared: dict[str, Any] = field(default_factory=dict)
    policy_sha256: str = ""
    rules: list[RuleResult] = field(default_factory=list)

    @property
    def grey_zone(self) -> bool:
        return self.approved and any(r.grey_zone for r in self.rules)


@dataclass(frozen=True)
class Evidence:
    """What the rules judge: the evaluate step's results and the version's lineage tags."""

    challenger: dict[str, float]  # test_<metric> of the challenger
    champion: dict[str, float] | None
    predictions: pd.DataFrame | None = None  # label, challenger[_k], champion[_k], slice columns (same rows)
    lineage: dict[str, str] = field(default_factory=dict)
    validation_success: bool | None = None
    model_bytes: int | None = None
    latency_p95_ms: float | None = None


class _Direction:
    """Comparisons in one metric's direction."""

    def __init__(self, direction: str) -> None:
        self.higher = direction == "higher"

    def ok(self, value: float, bound: float) -> bool:
        return value >= bound if self.higher else value <= bound

    def worse_by(self, value: float, reference: float) -> float:
        """How much worse ``value`` is than ``reference`` (negative: better)."""
        return reference - value if self.higher else value - reference


def _directions(definition: PipelineDefinition) -> dict[str, _Direction]:
    from ctrain.definition import TASK_METRICS

    return {m: _Direction(d) for m, d in TASK_METRICS[definition.task.type].items()}


def floor_rule(metric: str, bound: float, direction: _Direction, challenger: dict[str, float]) -> RuleResult:
    name, value = f"floor:test_{metric}", challenger.get(f"test_{metric}")
    if value is None:
        return RuleResult(name, False, f"challenger has no test_{metric}", {"bound": bound})
    ok = direction.ok(value, bound)
    word = ("floor" if direction.higher else "ceiling")
    relation = (">=" if direction.higher else "<=") if ok else ("below" if direction.higher else "above")
    return RuleResult(name, ok, f"test_{metric}={value:.4f} {relation} {word} {bound:.4f} "
                      f"({'higher' if direction.higher else 'lower'} is better)", {"value": value, "bound": bound})


def _scores(predictions: pd.DataFrame, who: str) -> np.ndarray:
    """One model's served output from the predictions frame: ``who`` or ``who_<k>`` columns."""
    columns = [c for c in predictions.columns if c == who or re.fullmatch(rf"{who}_\d+", c)]
    return predictions[sorted(columns, key=lambda c: (len(c), c))].to_numpy("float64")


def non_inferiority_rule(rule: NonInferiority, metric: str, direction: _Direction, evidence: Evidence) -> RuleResult:
    from ctrain.uncertainty import DELONG_METRICS, delong, paired_bootstrap

    name = "non_inferiority"
    if evidence.champion is None:
        return RuleResult(name, True, "no champion to compare with: judged on the floors alone", {"metric": metric})
    if evidence.predictions is None:
        return RuleResult(name, False, "no per-row predictions of both models on the test split; rerun evaluate",
                          {"metric": metric})
    frame = evidence.predictions
    y = frame["label"].to_numpy()
    new, old = _scores(frame, "challenger"), _scores(frame, "champion")
    use_delong = rule.method == "delong" or (rule.method == "auto" and metric in DELONG_METRICS)
    ci = (delong(y, new, old, rule.alpha) if use_delong else
          paired_bootstrap(metric, y, new, old, rule.samples, rule.alpha, rule.seed))
    # The bound in the bad direction, as an improvement (positive = challenger better).
    worst = ci.low if direction.higher else -ci.high
    best = ci.high if direction.higher else -ci.low
    passed = worst > -rule.margin and (not rule.require_superiority or worst > 0)
    better = worst > 0
    limit = 0.0 if rule.require_superiority else -rule.margin
    grey = passed and rule.grey_width > 0 and worst - limit <= rule.grey_width
    level = f"{100 * (1 - rule.alpha):g}%"
    gain = ci.estimate if direction.higher else -ci.estimate
    verdict = ("better than the champion" if better else
               "worse than the champion" if best < 0 else
               f"better on the point estimate ({gain:+.4f}) but not significantly: the interval includes no gain"
               if gain > 0 else "not significantly different from the champion")
    interval = f"[{ci.low:+.4f}, {ci.high:+.4f}]"
    reason = (f"test_{metric} challenger - champion = {ci.estimate:+.4f}, {level} {ci.method} interval {interval} "
              f"on {len(y)} paired rows: {verdict}; "
              + (f"{'passes' if passed else 'fails'} " +
                 ("superiority (bound must be > 0)" if rule.require_superiority else
                  f"non-inferiority margin {rule.margin}")))
    return RuleResult(name, passed, reason, {"metric": metric, **ci.to_dict(), "margin": rule.margin,
                                             "better": better, "rows": len(y)}, grey_zone=grey)


def _segments(frame: pd.DataFrame, spec: Slice) -> list[tuple[str, pd.Series]]:
    """(label, row mask) per segment of ``spec.column``."""
    import numpy as np

    values = frame[spec.column]
    if spec.bins is None:
        return [(str(v), values == v) for v in sorted(values.dropna().unique())]
    edges = spec.bins
    out = []
    for low, high in zip(edges, edges[1:], strict=False):
        label = f"[{low:g}, {high:g})" if np.isfinite(high) else f">= {low:g}"
        out.append((label, (values >= low) & (values < high)))
    return out


def slice_rule(spec: Slice, metric: str, direction: _Direction, evidence: Evidence,
               metric_fn: Any) -> RuleResult:
    name = f"slice:{spec.column}"
    frame = evidence.predictions
    if frame is None or spec.column not in frame.columns:
        return RuleResult(name, False, f"no test rows with column {spec.column!r} in the predictions; rerun evaluate",
                          {"column": spec.column})
    y = frame["label"].to_numpy()
    new = _scores(frame, "challenger")
    has_champion = evidence.champion is not None and any(c.startswith("champion") for c in frame.columns)
    old = _scores(frame, "champion") if has_champion else None
    segments, failures, skipped = [], [], []
    for label, mask in _segments(frame, spec):
        rows = int(mask.sum())
        m = mask.to_numpy()
        entry: dict[str, Any] = {"segment": label, "rows": rows}
        if rows < spec.min_rows or len(set(y[m].tolist())) < 2:
            skipped.append(label)
            entry["judged"] = False
            segments.append(entry)
            continue
        value = float(metric_fn(y[m], new[m]))
        entry.update(judged=True, challenger=value)
        if spec.floor is not None and not direction.ok(value, spec.floor):
            failures.append(f"{label}: {value:.4f} beyond floor {spec.floor}")
        if old is not None:
            reference = float(metric_fn(y[m], old[m]))
            entry["champion"] = reference
            drop = direction.worse_by(value, reference)
            entry["drop"] = drop
            if spec.max_drop is not None and drop > spec.max_drop:
                failures.append(f"{label}: {drop:.4f} worse than the champion's {reference:.4f} "
                                f"(max drop {spec.max_drop})")
        segments.append(entry)
    judged = sum(1 for s in segments if s["judged"])
    reason = (f"test_{metric} per {spec.column} segment: {judged} judged"
              + (f", {len(skipped)} under {spec.min_rows} rows or one class ({', '.join(skipped)})" if skipped else "")
              + ("; " + "; ".join(failures) if failures else "; all within floor and max drop"))
    return RuleResult(name, not failures, reason, {"column": spec.column, "metric": metric, "segments": segments})


def validation_rule(success: bool | None) -> RuleResult:
    if success is None:
        return RuleResult("validation", False, "no GX result for the training snapshot", {})
    return RuleResult("validation", bool(success), f"GX validation of the training snapshot: "
                      f"{'success' if success else 'failed'}", {"success": bool(success)})


def lineage_rule(tags: dict[str, str]) -> RuleResult:
    """Every lineage tag present; ``image`` is ``local`` or pinned by digest (a tag can move)."""
    missing = [t for t in LINEAGE_TAGS if not str(tags.get(t) or "").strip()]
    image = tags.get("image") or ""
    unpinned = bool(image) and image != "local" and "sha256:" not in image
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"image {image!r} is not pinned by digest (set CTRAIN_TRAINING_IMAGE to name@sha256:...)"] if unpinned else [])
    return RuleResult("lineage", not problems, "lineage complete" if not problems else
                      "lineage incomplete: " + "; ".join(problems), {"missing": missing, "image": image})


def size_rule(model_bytes: int | None, limit: int) -> RuleResult:
    if model_bytes is None:
        return RuleResult("model_size", False, "model size not measured", {"limit": limit})
    ok = model_bytes <= limit
    return RuleResult("model_size", ok, f"model artifacts {model_bytes} bytes {'<=' if ok else '>'} {limit}",
                      {"bytes": model_bytes, "limit": limit})


def latency_rule(p95_ms: float | None, limit: Latency) -> RuleResult:
    if p95_ms is None:
        return RuleResult("latency", False, "latency not measured", {"limit_ms": limit.max_p95_ms})
    ok = p95_ms <= limit.max_p95_ms
    return RuleResult("latency", ok, f"p95 {p95_ms:.2f} ms per batch of {limit.batch_rows} rows over "
                      f"{limit.batches} batches {'<=' if ok else '>'} {limit.max_p95_ms} ms",
                      {"p95_ms": p95_ms, "limit_ms": limit.max_p95_ms, "batch_rows": limit.batch_rows,
                       "batches": limit.batches})


def decide(loaded: LoadedPolicy, definition: PipelineDefinition, evidence: Evidence,
           primary_floor: float | None = None) -> Decision:
    """Run every rule of the policy on ``evidence``; approved when all pass."""
    from ctrain.evaluation import metric_function

    policy, primary = loaded.policy, definition.metrics.primary
    directions = _directions(definition)
    floors = dict(policy.floors)
    if primary_floor is not None:
        floors[primary] = primary_floor
    rules = [floor_rule(m, b, directions[m], evidence.challenger) for m, b in floors.items()]
    ni = policy.non_inferiority
    if ni is not None:
        metric = ni.metric or primary
        rules.append(non_inferiority_rule(ni, metric, directions[metric], evidence))
    for spec in policy.slices:
        metric = spec.metric or primary
        rules.append(slice_rule(spec, metric, directions[metric], evidence,
                                metric_function(definition.task.type, metric)))
    if policy.require_validation:
        rules.append(validation_rule(evidence.validation_success))
    if policy.require_lineage:
        rules.append(lineage_rule(evidence.lineage))
    if policy.max_model_bytes is not None:
        rules.append(size_rule(evidence.model_bytes, policy.max_model_bytes))
    if policy.latency is not None:
        rules.append(latency_rule(evidence.latency_p95_ms, policy.latency))
    metric = f"test_{primary}"
    compared = {"metric": metric, "challenger": evidence.challenger.get(metric),
                "champion": evidence.champion.get(metric) if evidence.champion else None}
    return Decision(all(r.passed for r in rules), policy.version,
                    [f"{'pass' if r.passed else 'FAIL'} {r.name}: {r.reason}" for r in rules],
                    compared, loaded.sha256, rules)


def metric_intervals(loaded: LoadedPolicy, definition: PipelineDefinition,
                     predictions: pd.DataFrame | None) -> dict[str, dict[str, dict[str, Any]]]:
    """Each model's test metrics with their interval (DeLong for the ROC AUC, else the bootstrap with the
    policy's B, alpha and seed), for the model card: ``{"challenger"|"champion": {metric: interval}}``."""
    from ctrain.uncertainty import BOOTSTRAP_METRICS, DELONG_METRICS, auc_with_interval, bootstrap_interval

    if predictions is None:
        return {}
    ni = loaded.policy.non_inferiority or NonInferiority()
    y = predictions["label"].to_numpy()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for who in ("challenger", "champion"):
        if not any(c.startswith(who) for c in predictions.columns):
            continue
        outputs = _scores(predictions, who)
        out[who] = {}
        for metric in dict.fromkeys([definition.metrics.primary, *definition.metrics.report]):
            if metric in DELONG_METRICS:
                out[who][f"test_{metric}"] = auc_with_interval(y, outputs, ni.alpha).to_dict()
            elif metric in BOOTSTRAP_METRICS:
                out[who][f"test_{metric}"] = bootstrap_interval(metric, y, outputs, ni.samples, ni.alpha,
                                                                ni.seed).to_dict()
    return out
