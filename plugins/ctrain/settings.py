"""Typed settings for the pipeline, read from ``CTRAIN_*`` environment variables.

Every switch between the embedded defaults (``make demo``) and the production profile is here; see
``.env.example`` for the full list. Nothing is read at import time: call :func:`get_settings`.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _default_home() -> Path:
    return PROJECT_ROOT / ".ctrain"


class Settings(BaseSettings):
    """Pipeline settings. Environment variable = ``CTRAIN_`` + upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="CTRAIN_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="Local state directory (git-ignored).")
    object_root: str = Field(
        default="",
        description="fsspec URI for datasets, checkpoints, reports (file:// or s3://). "
        "Default: file://{home}/objects.",
    )
    data_root: str = Field(
        default="",
        description="Where raw landed data lives (transactions partitions and feature sources). "
        "Default: {home}/data.",
    )
    feature_repo: Path = Field(default=PROJECT_ROOT / "feature_repo", description="Feast repo path.")
    mlflow_tracking_uri: str = Field(
        default="", description="MLflow tracking URI. Default: sqlite:///{home}/mlflow.db."
    )
    mlflow_artifact_root: str = Field(
        default="", description="Artifact root for new MLflow experiments. Default: {home}/mlartifacts."
    )
    experiment_name: str = Field(default="fraud_detector", description="MLflow experiment name.")
    model_name: str = Field(default="fraud_detector", description="Registered model name.")
    feature_service: str = Field(default="fraud_model_v1", description="Feast FeatureService to train on.")
    trainer_config: Path = Field(
        default=PROJECT_ROOT / "training_image" / "configs" / "default.yaml",
        description="Trainer YAML config used by the train task.",
    )
    nproc_per_node: int = Field(default=2, ge=1, description="torchrun processes per node.")
    launcher: str = Field(default="local", description="Training launcher: local | docker | kubernetes.")
    training_image: str = Field(default="ctrain-trainer:latest", description="Image for docker/k8s launchers.")
    min_test_roc_auc: float = Field(default=0.80, description="Governance: minimum test ROC AUC to promote.")
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO / moto), path-style.")

    @cached_property
    def resolved_object_root(self) -> str:
        return self.object_root or f"file://{self.home / 'objects'}"

    @cached_property
    def resolved_data_root(self) -> Path:
        return Path(self.data_root) if self.data_root else self.home / "data"

    @cached_property
    def resolved_tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @cached_property
    def resolved_artifact_root(self) -> str:
        return self.mlflow_artifact_root or str(self.home / "mlartifacts")


def get_settings() -> Settings:
    """Settings from the current environment (fresh each call, so tests can monkeypatch env)."""
    os.environ.setdefault("CTRAIN_HOME", str(_default_home()))
    return Settings()
