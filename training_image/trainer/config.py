"""The trainer's typed config tree: YAML file + ``--set section.key=value`` overrides, validated at load.

Every field has a type, a default (or is required) and a description; the same models produce the JSON
schema (``python -m trainer schema``) that the pipeline turns into Airflow Params. Fields marked
``hashed=False`` (locations, tracking, guardrails, distribution) do not change what is trained, so they
are left out of the config hash that identifies a run and guards resume.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from trainer.errors import ConfigError

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

TaskType = Literal["binary", "multiclass", "regression"]

# Validation metrics each task produces; early stopping and the LR plateau can only watch these.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("val_loss", "val_roc_auc", "val_pr_auc", "val_accuracy"),
    "multiclass": ("val_loss", "val_accuracy", "val_roc_auc"),
    "regression": ("val_loss", "val_rmse", "val_mae"),
}


def _no_credentials(uri: str) -> str:
    # URIs are logged and stored as MLflow params; a password in one would leak everywhere.
    if urlsplit(uri).password is not None:
        raise PydanticCustomError(
            "credentials_in_uri",
            "the URI embeds a password; remove it and pass credentials by environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the Airflow connection)",
        )
    return uri


Uri = Annotated[str, AfterValidator(_no_credentials)]


def _unhashed(**kwargs: Any) -> Any:
    """A field that does not take part in the config hash."""
    return Field(json_schema_extra={"hashed": False}, **kwargs)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset_uri: Uri = _unhashed(
        description="fsspec URI of the dataset snapshot directory (train/val/test parquet + manifest.json)."
    )
    verify_checksums: bool = _unhashed(
        default=True, description="Check each split file's sha256 against the snapshot manifest."
    )


class TaskConfig(_Section):
    type: TaskType = Field(default="binary", description="Learning task; selects loss, outputs and metrics.")
    num_classes: int | None = Field(
        default=None, ge=3, description="Number of classes; required for (and only for) multiclass."
    )

    @model_validator(mode="after")
    def _classes_match_type(self) -> TaskConfig:
        if self.type == "multiclass" and self.num_classes is None:
            raise ValueError("task.num_classes is required when task.type is 'multiclass'")
        if self.type != "multiclass" and self.num_classes is not None:
            raise ValueError("task.num_classes is only allowed when task.type is 'multiclass'")
        return self

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.type == "multiclass" and self.num_classes else 1


class ModelConfig(_Section):
    factory: str = Field(
        default="trainer.model:mlp",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="Dotted path 'package.module:function' of the model factory (see trainer.model.ModelSpec).",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments passed to the factory (e.g. hidden_sizes, dropout).",
    )
    factory_prefixes: list[str] | None = _unhashed(
        default=None,
        description="Module prefixes model.factory must be under; null allows any module (command-line "
        "use). The pipeline always sets it from CTRAIN_MODEL_FACTORY_PREFIXES.",
    )

    @model_validator(mode="after")
    def _factory_is_allowed(self) -> ModelConfig:
        # Checked at load, before anything is imported: a trigger must not choose what the trainer runs.
        module = self.factory.partition(":")[0]
        allowed = self.factory_prefixes
        if allowed is not None and not any(module == p or module.startswith(f"{p}.") for p in allowed):
            raise ValueError(
                f"model.factory {self.factory!r}: module {module!r} is not under the allowed prefixes "
                f"{', '.join(allowed) or '(none)'} (model.factory_prefixes); to allow it, add its package "
                "to CTRAIN_MODEL_FACTORY_PREFIXES"
            )
        return self


class OptimizerConfig(_Section):
    name: Literal["adamw", "sgd"] = Field(default="adamw", description="Optimizer.")
    lr: float = Field(default=1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled (AdamW) or L2 (SGD) weight decay.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum (ignored by AdamW).")


class SchedulerConfig(_Section):
    name: Literal["constant", "warmup_cosine", "step", "plateau"] = Field(
        default="warmup_cosine",
        description="LR schedule: constant; linear warmup then cosine decay (per step); "
        "step decay (per epoch); reduce on plateau of early_stopping.monitor (per evaluation).",
    )
    warmup_steps: int = Field(default=0, ge=0, description="warmup_cosine: linear warmup optimizer steps.")
    min_lr_ratio: float = Field(
        default=0.0, ge=0, le=1, description="warmup_cosine: final LR as a share of lr."
    )
    step_size: int = Field(default=1, ge=1, description="step: epochs between decays.")
    gamma: float = Field(default=0.5, gt=0, le=1, description="step / plateau: LR multiplier at each decay.")
    plateau_patience: int = Field(default=1, ge=0, description="plateau: evaluations without improvement.")


class TrainConfig(_Section):
    epochs: int = Field(default=10, ge=1, description="Maximum number of passes over the train split.")
    batch_size: int = Field(
        default=512,
        ge=1,
        description="Global batch: samples per optimizer step across all ranks and accumulation steps.",
    )
    grad_accum_steps: int = Field(
        default=1, ge=1, description="Micro-batches accumulated per optimizer step."
    )
    grad_clip_norm: float | None = Field(
        default=1.0,
        gt=0,
        description="Clip the global gradient L2 norm to this value; null disables clipping.",
    )
    eval_every_steps: int | None = Field(
        default=None, ge=1, description="Validate every N optimizer steps as well as at each epoch end."
    )
    log_every_steps: int = _unhashed(default=50, ge=1, description="Per-step metric logging interval.")
    bf16_autocast: bool = Field(default=True, description="bf16 autocast on CUDA (always off on CPU).")
    deterministic: bool = Field(
        default=False, description="torch.use_deterministic_algorithms; bit-identical reruns also on GPU."
    )
    max_steps: int | None = _unhashed(
        default=None,
        ge=1,
        description="Guardrail: stop (with a final checkpoint) after this many optimizer steps.",
    )
    max_wall_clock_s: float | None = _unhashed(
        default=None, gt=0, description="Guardrail: stop (with a final checkpoint) after this many seconds."
    )
    plateau_warning_evals: int = _unhashed(
        default=3,
        ge=1,
        description="Warn (log + MLflow tag) when val_loss has not improved for K evaluations.",
    )


class EarlyStoppingConfig(_Section):
    enabled: bool = Field(default=True, description="Stop when the monitored metric stops improving.")
    monitor: str = Field(
        default="val_loss",
        description="Validation metric that selects the best model and drives early stopping.",
    )
    mode: Literal["min", "max"] = Field(
        default="min", description="Whether lower or higher monitor is better."
    )
    patience: int = Field(default=3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0, description="Minimum change that counts as an improvement.")


class CheckpointConfig(_Section):
    uri: Uri = _unhashed(description="fsspec directory URI for this run's checkpoints (file:// or s3://).")
    every_steps: int | None = _unhashed(
        default=None, ge=1, description="Also checkpoint every N optimizer steps (always at each epoch end)."
    )
    keep_last: int = _unhashed(default=2, ge=1, description="Retention: keep this many newest checkpoints.")
    keep_best: bool = _unhashed(default=True, description="Retention: also keep the best checkpoint.")
    async_save: bool = _unhashed(
        default=True,
        description="Write checkpoints in a background thread; training blocks only for the copy.",
    )
    resume: bool = _unhashed(
        default=True, description="Resume from the latest valid checkpoint if there is one."
    )
    allow_mismatch: bool = _unhashed(
        default=False,
        description="Allow resuming a checkpoint written with another config hash or world size (DCP reshards).",
    )


class TrackingConfig(_Section):
    experiment: str = _unhashed(
        default="ctrain", description="MLflow experiment for a new run (ignored when MLFLOW_RUN_ID is set)."
    )
    run_name: str | None = _unhashed(default=None, description="MLflow run name for a new run.")
    system_metrics: bool = _unhashed(default=True, description="Log CPU/memory (and GPU) system metrics.")
    system_metrics_interval_s: float = _unhashed(
        default=10.0, gt=0, description="Seconds between two system-metric samples."
    )
    async_logging: bool = _unhashed(
        default=True, description="Send metrics to MLflow from a background thread."
    )
    flush_every_s: float = _unhashed(
        default=15.0, ge=0, description="Per-step and per-epoch metrics are sent in batches this often."
    )
    loss_curve: bool = _unhashed(default=True, description="Log a loss/metric curve PNG artifact.")


class OutputConfig(_Section):
    uri: Uri = _unhashed(description="fsspec directory URI where result.json is written.")


class DistributedConfig(_Section):
    backend: Literal["auto", "gloo", "nccl"] = _unhashed(
        default="auto", description="Process group backend; auto = nccl on CUDA, gloo on CPU."
    )
    timeout_s: float = _unhashed(
        default=120.0, gt=0, description="Collective timeout, so a lost peer fails the run fast (exit 75)."
    )
    # DDP options a user model may need (torch.nn.parallel.DistributedDataParallel's arguments of the
    # same names). They change how gradients are averaged, not their values, so they are not hashed.
    find_unused_parameters: bool = _unhashed(
        default=False,
        description="DDP: find the parameters that get no gradient in a step (a model with heads or "
        "branches it does not always use); costs a graph traversal per step.",
    )
    static_graph: bool = _unhashed(
        default=False,
        description="DDP: the same parameters are used (or unused) in every step, so DDP plans for that "
        "once; also accepts parameters that are never used, without find_unused_parameters' cost.",
    )
    gradient_as_bucket_view: bool = _unhashed(
        default=False,
        description="DDP: gradients are views into the all-reduce buckets (one gradient-sized copy less memory).",
    )
    bucket_cap_mb: float | None = _unhashed(
        default=None, gt=0, description="DDP: gradient all-reduce bucket size in MiB; null = DDP's default (25)."
    )


class TrainerConfig(_Section):
    """Root of the trainer config; ``trainer train --config FILE --set section.key=value``."""

    seed: int = Field(default=0, ge=0, description="Seed for python, numpy and torch (offset per rank).")
    data: DataConfig = Field(description="Dataset snapshot input.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="Task type.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model factory.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Learning-rate schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Loop settings and guardrails.")
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig, description="Best-model selection and early stopping."
    )
    checkpoint: CheckpointConfig = Field(description="Checkpoint storage and retention.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    output: OutputConfig = Field(description="Where result.json goes.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="torch.distributed."
    )

    @model_validator(mode="before")
    @classmethod
    def _sections_with_required_keys(cls, data: Any) -> Any:
        # An absent section is reported as its missing keys (data.dataset_uri), not as "data".
        if isinstance(data, dict):
            data = {"data": {}, "checkpoint": {}, "output": {}, **data}
        return data

    @model_validator(mode="after")
    def _monitor_fits_task(self) -> TrainerConfig:
        allowed = TASK_METRICS[self.task.type]
        if self.early_stopping.monitor not in allowed:
            raise ValueError(
                f"early_stopping.monitor {self.early_stopping.monitor!r} is not produced by task "
                f"{self.task.type!r}; allowed: {', '.join(allowed)}"
            )
        if self.train.batch_size % self.train.grad_accum_steps:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be divisible by "
                f"train.grad_accum_steps ({self.train.grad_accum_steps})"
            )
        return self

    def config_hash(self) -> str:
        """sha256 (first 16 hex) over the fields that change what is trained."""
        canonical = json.dumps(_hashed_part(self), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """The resolved config as ``{"section.key": value}`` (for MLflow params)."""
        return _flatten(self.model_dump(mode="json"))


def _in_hash(field: FieldInfo) -> bool:
    """False for fields declared with :func:`_unhashed`."""
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("hashed") is False)


def _hashed_part(model: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        if not _in_hash(field):
            continue
        value = getattr(model, name)
        out[name] = _hashed_part(value) if isinstance(value, BaseModel) else value
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path != "model.kwargs":
            flat.update(_flatten(value, f"{path}."))
        elif isinstance(value, dict):
            flat[path] = json.dumps(value, sort_keys=True)
        else:
            flat[path] = value
    return flat


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override to a raw config dict; the value is parsed as YAML."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    keys = path.strip().split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {key!r} is a value, not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({exc})") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainerConfig:
    """Read a YAML config, apply overrides, validate; raise ConfigError naming every bad field."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
        tree = loaded or {}
    _drop_kwargs_of_a_replaced_factory(tree, overrides or [])
    for assignment in overrides or []:
        apply_override(tree, assignment)
    try:
        return TrainerConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=str(path or "--set"))) from None


def _drop_kwargs_of_a_replaced_factory(tree: dict[str, Any], overrides: list[str]) -> None:
    """The file's ``model.kwargs`` belong to the file's ``model.factory``: when an override names another
    factory, the new one gets only the kwargs the overrides give it (not the old one's hidden sizes)."""
    model = tree.get("model")
    if not isinstance(model, dict) or "kwargs" not in model:
        return
    for assignment in overrides:
        key, _, value = assignment.partition("=")
        if key.strip() == "model.factory" and value.strip() != str(model.get("factory")):
            model["kwargs"] = {}
            return


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per error: field path, what is wrong, and the allowed keys or values."""
    lines = [f"invalid trainer config ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"][:-1])
            lines.append(f"  {loc}: unknown key; allowed keys here: {', '.join(allowed)}")
        elif err["type"] == "credentials_in_uri":  # never echo the value: it holds a secret
            lines.append(f"  {loc}: {err['msg']}")
        elif err["type"] == "missing":
            lines.append(f"  {loc}: required field is missing ({_description(err['loc'])})")
        else:
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _field_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = TrainerConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model = _field_model(loc)
    return sorted(model.model_fields) if model else []


def _description(loc: tuple[Any, ...]) -> str:
    model = _field_model(loc[:-1])
    field = model.model_fields.get(str(loc[-1])) if model else None
    return (field.description or "") if field else ""


def markdown_table() -> str:
    """The config reference table of training_image/README.md, generated from the models."""
    rows = ["| key | type | default | in hash | description |", "| --- | --- | --- | --- | --- |"]
    rows += [
        f"| `{key}` | {kind} | {default} | {'✓' if hashed else ''} | {description} |"
        for key, kind, default, hashed, description in _fields(TrainerConfig)
    ]
    return "\n".join(rows)


def _fields(model: type[BaseModel], prefix: str = "", hashed: bool = True) -> list[tuple[str, ...]]:
    out: list[tuple[Any, ...]] = []
    for name, field in model.model_fields.items():
        in_hash = hashed and _in_hash(field)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _fields(annotation, f"{prefix}{name}.", in_hash)
            continue
        kind = str(annotation).replace("typing.", "").replace(" | None", " or None")
        kind = getattr(annotation, "__name__", kind) if isinstance(annotation, type) else kind
        if field.is_required():
            default = "**required**"
        else:
            value = field.get_default(call_default_factory=True)
            default = f"`{'null' if value is None else repr(value)}`"
        out.append((f"{prefix}{name}", kind, default, in_hash, field.description or ""))
    return out


# Set by the pipeline itself: not offered as overrides in the DAG's Params.
PIPELINE_OWNED = ("data.", "checkpoint.uri", "output.", "model.factory_prefixes")


def overrides_schema() -> dict[str, Any]:
    """JSON schema of flat ``{"section.key": value}`` overrides: the DAG's ``trainer_overrides`` Param.

    Same types, bounds, enums and descriptions as the config models, so the Airflow UI rejects
    ``{"optim.lr": 0.002}`` or ``{"optimizer.lr": -1}`` at trigger time, before anything runs.
    """
    full = TrainerConfig.model_json_schema()
    properties: dict[str, Any] = {}
    for section, node in full["properties"].items():
        ref = node.get("$ref")
        if ref is None:
            properties[section] = _strip_titles(node)
            continue
        for key, sub in full["$defs"][ref.rsplit("/", 1)[1]]["properties"].items():
            properties[f"{section}.{key}"] = _strip_titles(sub)
    properties = {k: v for k, v in properties.items() if not k.startswith(PIPELINE_OWNED)}
    # Unknown keys are refused through propertyNames rather than additionalProperties: false, because
    # jsonschema's message (which Airflow returns as the HTTP 400 body) prints the schema node that
    # failed; for additionalProperties that is the whole schema (~24,000 characters), here it is the
    # one-line rule below, after the key itself.
    unknown_key = {"description": "not a trainer override key: the keys are listed in training_image/README.md; "
                   f"{', '.join(p + '*' if p.endswith('.') else p for p in PIPELINE_OWNED)} are set by the pipeline"}
    return {"type": "object", "properties": properties,
            "propertyNames": {"if": {"enum": sorted(properties)}, "else": {"not": unknown_key}}}


def _strip_titles(node: Any) -> Any:
    if isinstance(node, dict):
        # Defaults are the models', not the YAML file's: shown in the form they would mislead.
        return {k: _strip_titles(v) for k, v in node.items() if k not in ("title", "hashed", "default")}
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def json_schema() -> dict[str, Any]:
    """JSON schema of the config tree (used for the DAG's Params and the README table)."""
    return TrainerConfig.model_json_schema()
