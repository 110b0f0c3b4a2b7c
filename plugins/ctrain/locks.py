"""The promotion lock: one alias move (promote, rollback, retire, register) per registered model at a time.

Which lock (:func:`lock_kind`):

- ``postgres``: ``pg_advisory_lock`` on a stable 64-bit hash of the model name, on ``CTRAIN_LOCK_URL`` or,
  when that is unset, on the MLflow tracking URI if it is ``postgresql://`` (the production profile). It
  serializes every Airflow worker and every ``ctrain`` command that shares the database.
- ``file``: an ``fcntl`` lock on ``{object root}/locks/{model}.lock`` when the object root is local
  (``file://``), else on ``{home}/locks/{model}.lock``. The latter serializes this machine only; across
  machines on S3 the audit chain's conditional create is what lets exactly one of two movers win.

Waiting is bounded (``CTRAIN_LOCK_TIMEOUT_S``): a lock not obtained in time is ServiceUnavailable
(retryable), and nothing has been read or written by then.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from typing import TYPE_CHECKING

from ctrain import layout, storage
from ctrain.errors import ConfigError, ServiceUnavailable

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from ctrain.settings import Settings

log = logging.getLogger(__name__)

_POLL_S = 0.1
_POSTGRES_SCHEMES = ("postgresql", "postgres")


def advisory_key(model: str) -> int:
    """The signed 64-bit advisory lock key of ``model`` (stable across processes and versions)."""
    return int.from_bytes(hashlib.sha256(f"ctrain.promotion:{model}".encode()).digest()[:8], "big", signed=True)


def postgres_url(settings: Settings) -> str | None:
    """The libpq URL of the advisory lock's database, None when neither setting names Postgres."""
    for url in (settings.lock_url, settings.resolved_tracking_uri):
        scheme, sep, rest = url.partition("://")
        if sep and scheme.split("+")[0] in _POSTGRES_SCHEMES:
            return f"postgresql://{rest}"  # SQLAlchemy's postgresql+psycopg2:// is libpq's postgresql://
    if settings.lock_url:
        raise ConfigError(f"CTRAIN_LOCK_URL={settings.lock_url!r} is not a postgresql:// URL; set a Postgres URL "
                          "or unset it (the lock is then a file lock)")
    return None


def lock_kind(settings: Settings) -> str:
    """``postgres`` or ``file``: which lock :func:`promotion_lock` takes for these settings."""
    return "postgres" if postgres_url(settings) else "file"


def lock_path(settings: Settings, model: str) -> Path:
    """The file lock of ``model``: under the object root when it is local, else under the home."""
    from fsspec.implementations.local import LocalFileSystem

    fs, root = storage.open_fs(settings.resolved_object_root, settings)
    return layout.lock_file(root if isinstance(fs, LocalFileSystem) else settings.home, model)


@contextlib.contextmanager
def promotion_lock(settings: Settings, model: str) -> Iterator[str]:
    """Hold ``model``'s promotion lock for the block; yields a description of the lock held."""
    url = postgres_url(settings)
    held = _advisory_lock(url, model, settings.lock_timeout_s) if url else _file_lock(
        lock_path(settings, model), settings.lock_timeout_s)
    with held as what:
        yield what


@contextlib.contextmanager
def _advisory_lock(url: str, model: str, timeout_s: float) -> Iterator[str]:
    import psycopg2

    key = advisory_key(model)
    try:
        conn = psycopg2.connect(url, connect_timeout=max(1, int(timeout_s)))
    except psycopg2.OperationalError as exc:
        raise ServiceUnavailable(f"promotion lock of {model}: cannot reach Postgres ({str(exc).strip()})") from None
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            _wait(lambda: _try(cur, "SELECT pg_try_advisory_lock(%s)", key), timeout_s,
                  f"Postgres advisory lock {key} of {model}")
            try:
                yield f"postgres advisory lock {key}"
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()  # also releases the lock if the unlock above could not run


def _try(cur, sql: str, key: int) -> bool:
    cur.execute(sql, (key,))
    return bool(cur.fetchone()[0])


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[str]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:

        def attempt() -> bool:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        _wait(attempt, timeout_s, f"file lock {path}")
        try:
            yield f"file lock {path}"
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _wait(attempt, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not attempt():
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"{what} still held by another promotion after {timeout_s:g}s "
                                     "(CTRAIN_LOCK_TIMEOUT_S); retry when it is done")
        time.sleep(_POLL_S)
