"""Storage failures of checkpointing, classified: terminal (full, read-only) or retryable (anything else).

The trainer lease (trainer.lease) uses the same classification: one owner for "full / read-only /
transient".
"""

from __future__ import annotations

import errno
import logging
import time
from typing import TYPE_CHECKING, TypeVar

from trainer.errors import CheckpointError, RetryableError, TrainerError

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)
T = TypeVar("T")

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_error(uri: str, exc: BaseException) -> TrainerError:
    """A failed storage operation as the error the run ends with.

    A full or read-only destination (anywhere in the cause chain, or in any rank's failure inside DCP's
    CheckpointException) is terminal: retrying cannot help, and training on without checkpoints would
    lose the run. Anything else - endpoint unreachable, timeouts, throttling - is retryable: the
    uncommitted checkpoint has no manifest, and a rerun resumes from the last one.
    """
    for cause in causes(exc):
        code = getattr(cause, "errno", None)
        if code in _FULL:
            return CheckpointError(
                f"checkpoint destination {uri} is full ({cause}). Free space there, or set checkpoint.uri "
                "to storage with room for checkpoint.keep_last + 2 checkpoints; training stops rather than "
                "continue without checkpoints"
            )
        if isinstance(cause, PermissionError) or code in _READ_ONLY:
            return CheckpointError(
                f"checkpoint destination {uri} is not writable ({cause}). Make it writable for this user, "
                "or set checkpoint.uri to a writable location; training stops rather than continue without "
                "checkpoints"
            )
    return RetryableError(f"checkpoint storage {uri} failed: {type(exc).__name__}: {exc}")


def causes(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    stack = [exc]
    while stack:
        current = stack.pop()
        if current in found:
            continue
        found.append(current)
        stack += [c for c in (current.__cause__, current.__context__) if c is not None]
        failures = getattr(current, "failures", None)  # torch's CheckpointException: rank -> (error, tb)
        if isinstance(failures, dict):
            for failure in failures.values():
                failure = failure[0] if isinstance(failure, tuple) and failure else failure
                if isinstance(failure, BaseException):
                    stack.append(failure)
    return found


def with_retries(action: Callable[[], T], what: str, attempts: int = 4, first_delay_s: float = 0.5) -> T:
    """Run a storage action, retrying transient failures with exponential backoff."""
    for attempt in range(attempts - 1):
        try:
            return action()
        except Exception as exc:
            if isinstance(storage_error("", exc), CheckpointError):
                raise
            delay = first_delay_s * 2**attempt
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
    return action()
