"""A pipeline is a definition, not code: one typed, validated YAML file per pipeline under ``pipelines/``.

The definition says everything that is specific to one model: its owner, registered model, Feast feature
service, the landed tables and their columns, the task and its metrics, the validation thresholds, the
promotion rules, the trainer config and launcher, the schedule and the Assets it listens to. The generic
modules (features, validation, evaluation, governance, registry, pipeline, the DAGs) read it; none of
them names an example.

    python -m ctrain.definition check pipelines/*.yaml   # validate definitions (exit 65 naming each error)
    python -m ctrain.definition schema                   # JSON schema (pipelines/definition.schema.json)
    python -m ctrain.definition table                    # the reference table of pipelines/README.md
    python -m ctrain.definition policy-table             # the policy file's table of pipelines/README.md

Cheap to import (pydantic and yaml only): the DAG file loads every definition at parse time.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctrain.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ctrain.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TaskType = Literal["binary", "multiclass", "regression"]
Direction = Literal["higher", "lower"]

# Metrics each task computes on a split, with the direction in which they improve. Evaluation computes
# exactly these (``ctrain.evaluation``); a definition's primary metric and policy rules name them.
TASK_METRICS: dict[str, dict[str, Direction]] = {
    "binary": {"roc_auc": "higher", "pr_auc": "higher", "accuracy": "higher", "log_loss": "lower"},
    "multiclass": {"accuracy": "higher", "macro_f1": "higher", "log_loss": "lower"},
    "regression": {"rmse": "lower", "mae": "lower", "r2": "higher"},
}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Section):
    """Closed interval; either end may be open (null)."""

    min: float | None = Field(default=None, description="Lowest allowed value (null: no lower bound).")
    max: float | None = Field(default=None, description="Highest allowed value (null: no upper bound).")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class RegisteredModel(_Section):
    name: str = Field(description="MLflow registered model name (one per pipeline).")
    description: str = Field(default="", description="Registered model description shown in MLflow.")


class Events(_Section):
    """The labelled events: one row per training example, landed as daily partitions."""

    table: str = Field(
        description="Folder under the data root holding the events, laid out as "
        "`{table}/date=YYYY-MM-DD/*.parquet`."
    )
    id_column: str = Field(description="Unique integer id of an event.")
    timestamp_column: str = Field(description="UTC event time (a UTC timestamp of any unit; cast to "
                                  "`timestamp[us, tz=UTC]`); the point-in-time join's as-of time.")
    entity_columns: list[str] = Field(min_length=1, description="Join keys of the Feast entities.")
    label_column: str = Field(description="Target column.")
    event_features: list[str] = Field(
        default_factory=list, description="Feature columns taken from the event row itself (not from Feast)."
    )

    @model_validator(mode="after")
    def _distinct(self) -> Events:
        columns = [self.id_column, self.timestamp_column, *self.entity_columns, self.label_column,
                   *self.event_features]
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ValueError(f"column(s) {', '.join(repeated)} named twice; each column has one role")
        return self


class Task(_Section):
    type: TaskType = Field(description="Learning task: binary, multiclass or regression.")
    num_classes: int | None = Field(default=None, ge=3, description="multiclass only: number of classes.")

    @model_validator(mode="after")
    def _classes(self) -> Task:
        if (self.type == "multiclass") != (self.num_classes is not None):
            raise ValueError("task.num_classes is required for, and only for, task.type multiclass")
        return self


class Metrics(_Section):
    primary: str = Field(description="Metric that selects and gates the model (test split).")
    direction: Direction = Field(description="Whether higher or lower `primary` is better.")
    report: list[str] = Field(default_factory=list, description="Further metrics computed and logged.")


class Drift(_Section):
    max_feature_kl: float = Field(default=0.15, gt=0, description="KL divergence ceiling per feature.")
    max_label_kl: float = Field(default=0.03, gt=0, description="KL divergence ceiling of the label.")
    bins: int = Field(default=10, ge=2, le=100, description="Quantile bins of the reference distribution.")


class Validation(_Section):
    """Thresholds of the Great Expectations gate."""

    min_rows: int = Field(default=1000, ge=1, description="Row floor of the whole snapshot.")
    min_rows_per_split: int = Field(default=100, ge=1, description="Row floor of each split.")
    label_rate: Range | None = Field(default=None, description="binary: bounds of the positive rate per split.")
    target_range: Range | None = Field(default=None, description="regression: bounds of every target value.")
    feature_ranges: dict[str, Range] = Field(
        default_factory=dict, description="Plausible range per feature; outside = a broken upstream job."
    )
    missing_features: Literal["fail", "drop"] = Field(
        default="fail",
        description="An event without a feature row in its view's TTL: fail the gate, or drop the row.",
    )
    drift: Drift = Field(default_factory=Drift, description="Drift gate against the champion's training data.")


class Approval(_Section):
    """When a person must approve a promotion the policy allowed (Airflow's HITL approval task)."""

    required: Literal["never", "always", "on_promotion", "grey_zone"] = Field(
        default="never",
        description="never; always (every approved challenger); on_promotion (when a champion exists and would "
        "be replaced); grey_zone (when a rule passed by less than its margin's width).",
    )
    approvers: list[str] = Field(default_factory=list, description="Airflow users who may approve (empty: any "
                                 "user whose role may approve).")
    timeout_s: int = Field(default=86400, ge=1, description="Seconds to wait for a person; no answer rejects.")


class Governance(_Section):
    """Promotion: the policy file with the rules, and when a person must approve."""

    policy: Path = Field(description="Policy file (rules, version; `ctrain.governance.Policy`, fields in "
                         "pipelines/README.md), relative to this definition's directory.")
    approval: Approval = Field(default_factory=Approval, description="Human approval after the policy's yes.")
    keep_versions: int = Field(
        default=10, ge=1, description="Retirement keeps the newest N versions (and champion/previous/challenger)."
    )


class Training(_Section):
    config: Path = Field(description="Trainer YAML config, relative to the repository root.")
    launcher: Literal["local", "docker", "kubernetes"] | None = Field(
        default=None, description="Where torchrun runs; null: the deployment's CTRAIN_LAUNCHER."
    )
    nproc_per_node: int = Field(default=2, ge=1, description="torchrun processes per node.")
    nnodes: int | None = Field(
        default=None, ge=1,
        description="Nodes per run (kubernetes launcher with kubectl: an Indexed Job above 1); null: the "
        "deployment's CTRAIN_TRAINING_NNODES.",
    )


class Schedule(_Section):
    cron: str | None = Field(default="0 3 * * *", description="UTC cron of scheduled runs (null: none).")
    assets: list[str] = Field(
        default_factory=list, description="Asset names whose events start a run (e.g. the events table's)."
    )


class Example(_Section):
    """How `make demo PIPELINE=<name>` makes data for this pipeline (examples only)."""

    datagen: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                         description="`module:function(out, days, start, seed)` writing the landed tables.")
    days: int = Field(default=60, ge=15, description="Days of data the demo generates.")


class PipelineDefinition(_Section):
    """Root of a pipeline definition (`pipelines/<name>.yaml`)."""

    name: str = Field(description="Pipeline name: lower case, digits, underscores; the DAG ids derive from it.")
    owner: str = Field(description="Team or person answerable for the model (the DAGs' owner).")
    description: str = Field(default="", description="One paragraph: what the model is for.")
    model: RegisteredModel = Field(description="The MLflow registered model.")
    feature_service: str = Field(description="Feast FeatureService the model trains on (versioned, never edited).")
    feature_tables: list[str] = Field(
        default_factory=list,
        description="Folders under the data root of the feature sources (recorded as the snapshot's lineage); "
        "their timestamps must be `timestamp[us, tz=UTC]` (other units are refused: Feast's online store "
        "cannot load them).",
    )
    events: Events = Field(description="The labelled events table.")
    task: Task = Field(description="Learning task.")
    metrics: Metrics = Field(description="Metrics and the primary one.")
    validation: Validation = Field(default_factory=Validation, description="GX gate thresholds.")
    governance: Governance = Field(description="Promotion policy.")
    training: Training = Field(description="Trainer config and launcher.")
    schedule: Schedule = Field(default_factory=Schedule, description="Schedule and Assets.")
    example: Example | None = Field(default=None, description="Demo data generator (example pipelines only).")

    @model_validator(mode="after")
    def _consistent(self) -> PipelineDefinition:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use lower case letters, digits and underscores, "
                             "starting with a letter")
        known = TASK_METRICS[self.task.type]
        for metric in [self.metrics.primary, *self.metrics.report]:
            if metric not in known:
                raise ValueError(f"metric {metric!r} is not computed for task {self.task.type!r}; "
                                 f"known: {', '.join(known)}")
        if known[self.metrics.primary] != self.metrics.direction:
            raise ValueError(f"metrics.direction: {self.metrics.primary} improves when "
                             f"{known[self.metrics.primary]}, not {self.metrics.direction}")
        if self.validation.label_rate is not None and self.task.type != "binary":
            raise ValueError("validation.label_rate applies to binary tasks; use target_range for regression")
        if self.validation.target_range is not None and self.task.type != "regression":
            raise ValueError("validation.target_range applies to regression tasks")
        return self

    # ---- derived facts (one owner each) -------------------------------------------------------
    @property
    def dag_id(self) -> str:
        return f"continuous_training__{self.name}"

    @property
    def arrival_dag_id(self) -> str:
        return f"{self.events.table}_arrival__{self.name}"

    @property
    def primary_test_metric(self) -> str:
        return f"test_{self.metrics.primary}"

    @property
    def test_metrics(self) -> list[str]:
        return [f"test_{m}" for m in dict.fromkeys([self.metrics.primary, *self.metrics.report])]

    def better(self, a: float, b: float) -> bool:
        """True if primary-metric value ``a`` is strictly better than ``b``."""
        return a > b if self.metrics.direction == "higher" else a < b

    def trainer_config_path(self, root: Path = PROJECT_ROOT) -> Path:
        return self.training.config if self.training.config.is_absolute() else root / self.training.config


# ---- loading --------------------------------------------------------------------------------------
def load_file(path: Path) -> PipelineDefinition:
    """Read and validate one definition; ConfigError names the file and every bad field."""
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"pipeline definition {path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"pipeline definition {path}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"pipeline definition {path}: top level must be a mapping")
    try:
        definition = PipelineDefinition.model_validate(tree)
    except ValidationError as exc:
        lines = [f"pipeline definition {path} is invalid:"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            lines.append(f"  {loc}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("\n".join(lines)) from None
    if path.stem != definition.name:
        raise ConfigError(f"pipeline definition {path}: file name must be {definition.name}.yaml (its name)")
    from ctrain.governance import load_policy

    load_policy(definition, path.parent)  # a bad policy fails with the definition, at DAG parse time
    return definition


def definition_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if not p.name.startswith("."))


def load_all(directory: Path) -> dict[str, PipelineDefinition]:
    """Every definition in ``directory`` by name (ConfigError on the first bad one)."""
    found = {d.name: d for d in (load_file(p) for p in definition_files(directory))}
    if not found:
        raise ConfigError(f"no pipeline definitions (*.yaml) in {directory}; set CTRAIN_PIPELINES_DIR")
    return found


def load(settings: Settings, name: str) -> PipelineDefinition:
    """The definition called ``name`` in the settings' pipelines directory."""
    path = Path(settings.pipelines_dir) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(load_all(Path(settings.pipelines_dir)))) or "none"
        raise ConfigError(f"no pipeline {name!r} in {settings.pipelines_dir} (known: {known})")
    return load_file(path)


# ---- generated docs -------------------------------------------------------------------------------
def json_schema() -> dict[str, Any]:
    return PipelineDefinition.model_json_schema()


def markdown_table(model: type[BaseModel] = PipelineDefinition) -> str:
    """The field reference of pipelines/README.md, generated from the models (a definition's, or with
    ``model`` the policy file's)."""
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    rows += [f"| `{k}` | {t} | {d} | {desc} |" for k, t, d, desc in _fields(model)]
    return "\n".join(rows)


def _fields(model: type[BaseModel], prefix: str = "") -> Iterable[tuple[str, str, str, str]]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        items = getattr(annotation, "__args__", ()) if getattr(annotation, "__origin__", None) is list else ()
        if len(items) == 1 and isinstance(items[0], type) and issubclass(items[0], BaseModel):
            yield f"{prefix}{name}", "list", "`[]`", field.description or ""
            yield from _fields(items[0], f"{prefix}{name}[].")
            continue
        if nested is None:  # `X | None` of a section
            args = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            nested = args[0] if len(args) == 1 and name != "feature_ranges" else None
        if nested is not None and nested is not Range:
            yield from _fields(nested, f"{prefix}{name}.")
            continue
        kind = str(annotation)
        for noise in ("typing.", "ctrain.definition.", "ctrain.governance.", "__main__.", "pathlib."):
            kind = kind.replace(noise, "")
        kind = re.sub(r"Literal\[([^\]]*)\]", lambda m: m.group(1).replace("'", "").replace(", ", " / "), kind)
        kind = getattr(annotation, "__name__", kind) if isinstance(annotation, type) else kind
        if field.is_required():
            default = "**required**"
        else:
            value = field.get_default(call_default_factory=True)
            value = value.model_dump() if isinstance(value, BaseModel) else value
            default = f"`{json.dumps(value)}`"
        yield f"{prefix}{name}", kind.replace("|", "or"), default, field.description or ""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args else ""
    if command == "schema":
        print(json.dumps(json_schema(), indent=1, sort_keys=True))
        return 0
    if command == "table":
        print(markdown_table())
        return 0
    if command == "policy-table":
        from ctrain.governance import Policy

        print(markdown_table(Policy))
        return 0
    if command == "check" and args:
        failed = 0
        for path in args:
            try:
                definition = load_file(Path(path))
                print(f"{path}: ok ({definition.task.type}, primary {definition.metrics.primary})")
            except ConfigError as exc:
                print(exc, file=sys.stderr)
                failed += 1
        return 65 if failed else 0
    print("usage: python -m ctrain.definition check FILE... | schema | table | policy-table", file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main())
