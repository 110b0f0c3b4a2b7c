"""Typed settings for the pipeline: one field per fact, read from ``CTRAIN_*`` environment variables and
from a ``.env`` file when there is one.

Every switch between the embedded defaults (``make demo``) and the production profile is here; see
``.env.example`` for the full list. Nothing is read at import time: call :func:`get_settings`.

Precedence, highest first: values passed to ``Settings(...)``; the real environment; ``./.env`` (the
working directory's); ``{project root}/.env``; the defaults below. ``.env`` holds ``CTRAIN_*`` settings
only: credentials (``AWS_*``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``) are read by boto and MLflow from
the real environment.

A ``CTRAIN_*`` variable (in the environment or a ``.env``) that is not a setting is refused with the list
of known ones: a typo must not silently leave the default in place. ``CTRAIN_TEST_*`` names are reserved
for the test suites' hooks and ``CTRAIN_IMAGES_*`` for ``scripts/images.sh`` (how images are built, not how
the pipeline runs); neither are settings.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ctrain.errors import ConfigError

if TYPE_CHECKING:
    from ctrain.definition import PipelineDefinition

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENV_PREFIX = "CTRAIN_"
# Reserved for the test suites' own hooks (e.g. the trainer tests' CTRAIN_TEST_RECORD_DIR); never settings.
TEST_HOOK_PREFIX = "CTRAIN_TEST_"
# Read by scripts/images.sh only (engine state, base image, mirror, rebuild); never settings.
IMAGES_PREFIX = "CTRAIN_IMAGES_"
RESERVED_PREFIXES = (TEST_HOOK_PREFIX, IMAGES_PREFIX)


def env_files() -> tuple[Path, ...]:
    """The ``.env`` files read, lowest precedence first: the project root's, then the working directory's."""
    return (PROJECT_ROOT / ".env", Path.cwd() / ".env")
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _default_home() -> Path:
    return PROJECT_ROOT / ".ctrain"


class Settings(BaseSettings):
    """Pipeline settings. Environment variable = ``CTRAIN_`` + upper-case field name."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    home: Path = Field(default_factory=_default_home, description="Local state directory (git-ignored).")
    object_root: str = Field(
        default="",
        description="fsspec URI for datasets, checkpoints, reports (file:// or s3://). "
        "Default: file://{home}/objects.",
    )
    data_root: str = Field(
        default="",
        description="Where raw landed data lives (every pipeline's event partitions and feature sources). "
        "Default: {home}/data.",
    )
    feature_repo: Path = Field(default=PROJECT_ROOT / "feature_repo", description="Feast repo path.")
    pipelines_dir: Path = Field(
        default=PROJECT_ROOT / "pipelines", description="Directory of the pipeline definitions (*.yaml)."
    )
    mlflow_tracking_uri: str = Field(
        default="", description="MLflow tracking URI. Default: sqlite:///{home}/mlflow.db."
    )
    mlflow_artifact_root: str = Field(
        default="", description="Artifact root for new MLflow experiments. Default: {home}/mlartifacts."
    )
    pipeline: str = Field(
        default="fraud",
        description="Pipeline this process works for: pipelines/<name>.yaml in pipelines_dir. Everything "
        "specific to one model (registered model, feature service, trainer config, policy) is in there.",
    )
    launcher: str = Field(
        default="local",
        description="Deployment's training launcher (local | docker | kubernetes), unless the pipeline "
        "definition names one.",
    )
    training_image: str = Field(default="ctrain-trainer:latest", description="Image for docker/k8s launchers.")
    # The docker and kubernetes launchers (plugins/ctrain/launchers.py).
    docker_network: str = Field(
        default="",
        description="Network of the training container: host, none, or a named network (compose's) to "
        "reach MLflow/S3. Default: none when every URI is local (file://, SQLite), else host.",
    )
    training_shm_size: str = Field(default="2g", description="/dev/shm of the training container (docker).")
    training_gpus: int = Field(
        default=0, ge=-1, description="GPUs per training container or pod: 0 none, -1 all (docker), N that many."
    )
    training_cpu: str = Field(default="2", description="CPU request and limit of the training pod.")
    training_memory: str = Field(default="8Gi", description="Memory request and limit of the training pod.")
    training_secret: str = Field(
        default="ctrain-trainer-env",
        description="Kubernetes Secret the training pod takes its credentials from (envFrom).",
    )
    k8s_namespace: str = Field(default="ctrain", description="Namespace of the training pod.")
    k8s_node_selector: dict[str, str] = Field(
        default_factory=dict, description='nodeSelector of the training pod, JSON (e.g. {"pool": "gpu"}).'
    )
    k8s_tolerations: list[dict[str, str]] = Field(
        default_factory=list, description="tolerations of the training pod, a JSON list of Kubernetes tolerations."
    )
    pod_runtime: str = Field(
        default="kubectl",
        description="What runs the training pod for the kubernetes launcher: kubectl (the current context's "
        "cluster) or podman (podman kube play on this host).",
    )
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO / moto), path-style.")
    training_nnodes: int = Field(
        default=1, ge=1,
        description="Nodes of a training run (kubernetes launcher with kubectl): above 1, an Indexed Job of "
        "that many pods, one torchrun each, instead of one Pod.",
    )
    backup_uri: str = Field(
        default="", description="Where `python -m ctrain.backup backup` writes backups (directory or s3:// "
        "prefix, outside the object root). Default: file://{home}/backups.",
    )

    # What a trigger may ask of the trainer: the Params' schema carries these bounds (read when the DAG
    # is parsed) and the train task checks them again, so a trigger cannot exhaust the machine.
    model_factory_prefixes: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("trainer.model",),
        description="Comma-separated module prefixes whose factories model.factory may name "
        "(e.g. trainer.model,my_pkg.models); enforced at trigger time and by the trainer.",
    )
    max_epochs: int = Field(default=1000, ge=1, description="Upper bound on train.epochs.")
    max_steps: int = Field(
        default=1_000_000, ge=1, description="Upper bound on train.max_steps; the pipeline always sets one."
    )
    max_batch_size: int = Field(default=65536, ge=1, description="Upper bound on train.batch_size.")
    max_train_wall_clock_s: float = Field(
        default=4 * 3600.0, gt=0,
        description="Upper bound on train.max_wall_clock_s; the pipeline always sets one (seconds).",
    )

    # The promotion lock (plugins/ctrain/locks.py): who may move a model's aliases, one at a time.
    lock_url: str = Field(
        default="",
        description="Postgres URL for the promotion lock (pg_advisory_lock). Default: the MLflow tracking URI "
        "when it is postgresql://, else a file lock under the object root (file://) or the home.",
    )
    lock_timeout_s: float = Field(
        default=60.0, gt=0, description="How long a promotion, rollback or retirement waits for the lock (seconds)."
    )

    # The embedded UIs (`make up`): loopback only unless opened deliberately.
    ui_host: str = Field(
        default="127.0.0.1",
        description="Address the Airflow API server and the MLflow UI of `make up` listen on; "
        "0.0.0.0 opens them to the network.",
    )
    airflow_port: int = Field(default=8080, ge=1, le=65535, description="Port of the Airflow API server/UI.")
    mlflow_port: int = Field(default=5000, ge=1, le=65535, description="Port of the MLflow UI (`make up`).")
    up_timeout_s: int = Field(
        default=300, ge=1, description="How long `make up` waits for every component to be healthy (seconds)."
    )

    def __init__(self, **values: object) -> None:
        # The .env files are resolved per instance: the working directory is the caller's, not the importer's.
        values.setdefault("_env_file", tuple(p for p in env_files() if p.is_file()) or None)
        super().__init__(**values)

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        unknown = unknown_variables()
        if unknown:
            raise ConfigError(
                "unknown ctrain setting(s): "
                + "; ".join(f"{name} (in {where})" + _did_you_mean(name) for name, where in unknown)
                + f". Known settings: {', '.join(sorted(known_variables()))} (see .env.example); "
                f"{TEST_HOOK_PREFIX}* is reserved for test hooks and {IMAGES_PREFIX}* for scripts/images.sh"
            )
        return self

    @field_validator("model_factory_prefixes", mode="before")
    @classmethod
    def _split_prefixes(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(p.strip() for p in value.split(",") if p.strip())
        if isinstance(value, list | tuple):
            bad = [p for p in value if not _MODULE_PATH.fullmatch(str(p))]
            if bad or not value:
                raise ValueError(
                    f"{','.join(map(str, value))!r}: expected comma-separated "
                    "dotted module paths such as trainer.model,my_pkg.models"
                )
        return value

    @field_validator("object_root", "data_root", "mlflow_tracking_uri", "mlflow_artifact_root", "s3_endpoint_url",
                     "backup_uri", "lock_url")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        # These URIs are logged, passed as argv and stored as MLflow tags: a password in one leaks everywhere.
        if uri and urlsplit(uri).password is not None:
            raise ValueError(
                "the URI embeds a password; remove it and pass credentials by environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
            )
        return uri

    # ---- the pipeline's facts: owned by its definition, read through here ------------------------
    @cached_property
    def definition(self) -> PipelineDefinition:
        from ctrain.definition import load

        return load(self, self.pipeline)

    @property
    def model_name(self) -> str:
        return self.definition.model.name

    @property
    def experiment_name(self) -> str:
        return self.definition.model.name

    @property
    def feature_service(self) -> str:
        return self.definition.feature_service

    @property
    def trainer_config(self) -> Path:
        return self.definition.trainer_config_path()

    @property
    def nproc_per_node(self) -> int:
        return self.definition.training.nproc_per_node

    @property
    def resolved_nnodes(self) -> int:
        return self.definition.training.nnodes or self.training_nnodes

    @property
    def resolved_launcher(self) -> str:
        return self.definition.training.launcher or self.launcher

    @cached_property
    def resolved_object_root(self) -> str:
        return self.object_root or f"file://{self.home / 'objects'}"

    @cached_property
    def resolved_backup_uri(self) -> str:
        return self.backup_uri or f"file://{self.home / 'backups'}"

    @cached_property
    def resolved_data_root(self) -> Path:
        return Path(self.data_root) if self.data_root else self.home / "data"

    @cached_property
    def resolved_tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @cached_property
    def resolved_artifact_root(self) -> str:
        return self.mlflow_artifact_root or str(self.home / "mlartifacts")


def known_variables() -> set[str]:
    """Every ``CTRAIN_*`` variable that is a setting: ``CTRAIN_`` + the upper-case field name."""
    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def unknown_variables() -> list[tuple[str, str]]:
    """``(name, where)`` of each ``CTRAIN_*`` variable in the environment or a ``.env`` that is no setting."""
    from dotenv import dotenv_values

    known = known_variables()
    sources = [("the environment", os.environ.keys())]
    sources += [(str(path), dotenv_values(path).keys()) for path in env_files() if path.is_file()]
    return [(name, where) for where, names in sources for name in sorted(names)
            if name.upper().startswith(ENV_PREFIX) and not name.upper().startswith(RESERVED_PREFIXES)
            and name.upper() not in known]


def _did_you_mean(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name.upper(), sorted(known_variables()), n=1)
    return f", did you mean {close[0]}?" if close else ""


def get_settings(pipeline: str | None = None) -> Settings:
    """Settings from the current environment and ``.env`` (fresh each call, so tests can monkeypatch env),
    for ``pipeline`` (default: ``CTRAIN_PIPELINE``, else fraud). ``CTRAIN_HOME`` is then exported (when
    unset) so processes started from here (Feast, scripts) see the same home."""
    try:
        settings = Settings(**({"pipeline": pipeline} if pipeline else {}))
    except ValidationError as exc:  # pydantic's own message repeats the value, which may hold a secret
        problems = [f"{ENV_PREFIX}{'_'.join(map(str, e['loc'])).upper()}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()]
        raise ConfigError("invalid ctrain settings: " + "; ".join(problems)) from None
    os.environ.setdefault("CTRAIN_HOME", str(settings.home))
    return settings
