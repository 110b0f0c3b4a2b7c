"""Domain errors. Each one says what failed, which input, and where to look or how to fix it.

Each error knows whether a retry can help (``retryable``). :func:`fail_fast` turns the ones that cannot
into Airflow's ``AirflowFailException`` (fail now, no retry) in one place; every task of the DAGs wears it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

F = TypeVar("F", bound="Callable[..., Any]")


class CtrainError(Exception):
    """Base class for every error ctrain raises on purpose.

    Terminal by default: a deliberate error names a bad input or state, which a retry meets again.
    """

    retryable: bool = False


class ServiceUnavailable(CtrainError):
    """A service (MLflow, object storage) did not answer in time; a retry may succeed."""

    retryable = True


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
    """The training process exited with a non-zero code; terminal when the trainer's contract says so
    (``trainer.contract.TERMINAL_EXIT_CODES``: 65 bad data/config, 70 divergence or bug)."""

    def __init__(self, exit_code: int, message: str):
        self.exit_code = exit_code
        super().__init__(message)

    @property
    def retryable(self) -> bool:
        from trainer.contract import TERMINAL_EXIT_CODES

        return self.exit_code not in TERMINAL_EXIT_CODES


class GovernanceRejected(CtrainError):
    """The promotion policy refused a challenger."""


def is_terminal(exc: BaseException) -> bool:
    """No retry can fix ``exc``: a ctrain error that is not retryable. Anything else (I/O, network, a
    killed process) may pass on a retry."""
    return isinstance(exc, CtrainError) and not exc.retryable


def fail_fast(task_body: F) -> F:
    """Task decorator: a terminal error fails the Airflow task at once (``AirflowFailException``, so
    no retry is spent on it); a retryable one propagates, and the task's ``retries`` apply."""

    @functools.wraps(task_body)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return task_body(*args, **kwargs)
        except CtrainError as exc:
            if not is_terminal(exc):
                raise
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc

    run.fails_fast = True  # type: ignore[attr-defined]  # the DAG integrity test checks every task has it
    return run  # type: ignore[return-value]
