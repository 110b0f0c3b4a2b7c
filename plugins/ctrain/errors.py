"""Domain errors. Each one says what failed, which input, and where to look or how to fix it."""

from __future__ import annotations


class CtrainError(Exception):
    """Base class for every error ctrain raises on purpose."""


class ConfigError(CtrainError):
    """A setting, Param or config value is invalid."""


class DataError(CtrainError):
    """Input data is missing, malformed or inconsistent."""


class ValidationFailed(CtrainError):
    """The Great Expectations gate rejected a dataset snapshot."""

    def __init__(self, dataset_version: str, failed: list[str], report_uri: str):
        self.dataset_version = dataset_version
        self.failed = failed
        self.report_uri = report_uri
        lines = "\n".join(f"  - {f}" for f in failed)
        super().__init__(
            f"Dataset {dataset_version} failed {len(failed)} expectation(s):\n{lines}\n"
            f"Full report: {report_uri}"
        )


class TrainingFailed(CtrainError):
    """The training process exited with a non-zero code."""

    # Trainer exit codes that no retry can fix (65 bad data/config, 70 divergence or bug).
    TERMINAL_CODES = frozenset({65, 70})

    def __init__(self, exit_code: int, message: str):
        self.exit_code = exit_code
        super().__init__(message)

    @property
    def retryable(self) -> bool:
        return self.exit_code not in self.TERMINAL_CODES


class GovernanceRejected(CtrainError):
    """The promotion policy refused a challenger."""
