"""The trainer's contract with whoever launches it (docs/contracts.md): its exit codes and the record it
leaves under ``output.uri``. The one definition of both; the pipeline (``ctrain``) imports this module.

Exit codes: 0 ok, 65 bad data or config (terminal), 70 divergence or bug (terminal), 75 retryable (lost
peer, storage timeout, checkpoint directory leased by another trainer). Airflow retries only 75, and a
retry resumes from the last good checkpoint.

Records: ``result.json`` (the outcome: a succeeded result, or the failure when it is ours to replace)
and ``failure.json`` (the last failed attempt), both a :class:`TrainerResult`. torchrun exits 1 whenever
a worker fails, so the launcher reads the trainer's own code from ``failure.json``.

Only pydantic is imported here, so the Airflow side can import it cheaply.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EXIT_OK = 0
EXIT_BAD_INPUT = 65
EXIT_SOFTWARE = 70
EXIT_RETRYABLE = 75
# No retry can fix these: the same input meets the same error.
TERMINAL_EXIT_CODES = frozenset({EXIT_BAD_INPUT, EXIT_SOFTWARE})

RESULT_FILE = "result.json"
FAILURE_FILE = "failure.json"


def describe_exit(code: int) -> str:
    """What an exit code of the trainer (or a signal, negative) means for the caller."""
    if code == EXIT_OK:
        return "success"
    if code == EXIT_BAD_INPUT:
        return "bad data or config (terminal: fix the input, retrying will not help)"
    if code == EXIT_SOFTWARE:
        return "training diverged or hit a bug (terminal: see the trainer log above)"
    if code == EXIT_RETRYABLE:
        return "retryable failure (lost peer or storage timeout); a retry resumes from the last checkpoint"
    if code < 0:
        return f"killed by signal {-code}; a retry resumes from the last checkpoint"
    return f"unexpected exit code {code}"


class TrainerResult(BaseModel):
    """One record of ``result.json`` / ``failure.json``. A succeeded result carries the model and metrics;
    a failed one the exit code and the error. Every field is written (null where it does not apply);
    unknown keys are refused when read: a new field is added here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Literal["succeeded", "failed"] = Field(description="Outcome of the run.")
    mlflow_run_id: str | None = Field(default=None, description="The MLflow run the trainer logged to.")
    config_hash: str | None = Field(default=None, description="Semantic hash of the trainer config.")
    seed: int | None = Field(default=None, description="Seed of the run.")
    # succeeded
    model_uri: str | None = Field(default=None, description="The exported MLflow model (models:/m-<id>).")
    metrics: dict[str, float] = Field(default_factory=dict, description="Test metrics and best_* of validation.")
    best_epoch: int | None = Field(default=None, description="Epoch of the best checkpoint.")
    epochs_run: int | None = Field(default=None, description="Epochs trained.")
    global_step: int | None = Field(default=None, description="Optimizer steps taken.")
    checkpoint: str | None = Field(default=None, description="URI of the checkpoint the model was exported from.")
    dataset_version: str | None = Field(default=None, description="Snapshot trained on.")
    world_size: int | None = Field(default=None, description="Number of processes.")
    stopped_reason: str | None = Field(default=None, description="Why training stopped.")
    model_package: dict[str, str] | None = Field(
        default=None, description="The user model's distribution {name, version} (null for trainer.model's)."
    )
    # failed
    exit_code: int | None = Field(default=None, description="The trainer's exit code (failed runs).")
    error: str | None = Field(default=None, description="'<ExceptionType>: <message>' (failed runs).")
    retryable: bool | None = Field(default=None, description="Whether a retry can succeed (failed runs).")

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @classmethod
    def failure(cls, exc: BaseException, code: int, run_id: str | None, **fields: Any) -> TrainerResult:
        """The failure record of an exception that ends the run with ``code``."""
        return cls(status="failed", exit_code=code, error=f"{type(exc).__name__}: {exc}",
                   retryable=code == EXIT_RETRYABLE, mlflow_run_id=run_id, **fields)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes) -> TrainerResult:
        """Parse a record; ValueError (pydantic's ValidationError is one) if it is not one."""
        return cls.model_validate_json(data)
