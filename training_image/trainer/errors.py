"""Errors the trainer raises on purpose, each bound to the process exit code the pipeline acts on.

Exit codes (docs/contracts.md): 65 bad data or config (terminal), 70 divergence or bug (terminal),
75 retryable (lost peer, storage timeout, checkpoint directory leased by another trainer). Airflow
retries only 75, and a retry resumes from the last good checkpoint.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 65
EXIT_SOFTWARE = 70
EXIT_RETRYABLE = 75


class TrainerError(Exception):
    """Base class; ``exit_code`` is what the process returns when this ends the run."""

    exit_code = EXIT_SOFTWARE


class ConfigError(TrainerError):
    """The config file or a ``--set`` override is invalid."""

    exit_code = EXIT_BAD_INPUT


class DataError(TrainerError):
    """The dataset snapshot is missing, corrupt or does not match its manifest."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(TrainerError):
    """A checkpoint cannot be used (incompatible run, failed verification, unwritable destination)."""

    exit_code = EXIT_BAD_INPUT


class DivergenceError(TrainerError):
    """Loss or gradient norm became non-finite; the bad state is not checkpointed."""

    exit_code = EXIT_SOFTWARE


class RetryableError(TrainerError):
    """A transient failure (lost peer, storage unavailable); rerunning resumes from the last checkpoint."""

    exit_code = EXIT_RETRYABLE
