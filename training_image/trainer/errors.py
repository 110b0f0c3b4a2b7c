"""Errors the trainer raises on purpose, each bound to the process exit code the pipeline acts on.

The exit codes are defined in :mod:`trainer.contract` (re-exported here for the trainer's modules):
65 bad data or config (terminal), 70 divergence or bug (terminal), 75 retryable.
"""

from __future__ import annotations

from trainer.contract import EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRYABLE, EXIT_SOFTWARE

__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "EXIT_RETRYABLE", "EXIT_SOFTWARE", "CheckpointError", "ConfigError",
           "DataError", "DivergenceError", "RetryableError", "TrainerError"]


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
