"""One trainer at a time per checkpoint directory: a lease object beside the checkpoints.

``{checkpoint.uri}/lease.json`` names its holder and until when it holds the directory::

    {"owner": "<host>:<torchrun pid>:<rendezvous id>", "lease_id": "...", "expires_at": 1764590000.0,
     "ttl_s": 60.0, "config_hash": "...", "mlflow_run_id": "...", "released": false, ...}

Rank 0 takes the lease before anything under the directory is read or changed, a background thread renews
it every ``ttl_s / 4``, and the job gives it up when it ends. A trainer that finds a live lease of another
owner (a duplicated task, a zombie worker of an earlier attempt) stops with :class:`LeaseHeld` - exit 75,
so Airflow retries later - without touching anything. A lease past its expiry (its holder died without
giving it up) or released is taken over. The owner id is one per torchrun job and the same across the
job's restarts, so a restarted job takes its own lease back at once. Expiry is wall-clock time: the
clocks of the hosts involved must agree to well within ``ttl_s``.

The lease also carries the job's MLflow run id from the moment the run exists, so a restart before the
first checkpoint commit (whose trainer state carries the run id from then on) continues the same run.
Giving the lease up after a retryable failure keeps the record, marked released, for the retry; after a
success or a terminal failure it is deleted.

Race safety is what the storage allows:

- ``file://``: every read-decide-write holds an exclusive ``flock`` on the directory and writes are atomic
  renames, so of two trainers starting together exactly one gets the lease (one host, or a filesystem
  whose locks work across hosts).
- ``s3://``: conditional writes - ``If-None-Match: *`` to create, ``If-Match: <ETag read>`` to renew or
  take over - which AWS S3 and current MinIO enforce.
- Every write is also read back and its ``lease_id`` checked. On a store that ignores the conditions, two
  trainers writing within the same instant can both start; the renewal then finds the other's record and
  the loser stops before its next checkpoint (:meth:`Lease.check`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fsspec.implementations.local import LocalFileSystem

from trainer import distributed
from trainer.errors import CheckpointError, RetryableError, TrainerError
from trainer.storage import filesystem, join

if TYPE_CHECKING:
    from collections.abc import Iterator

    from trainer.distributed import DistContext

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
# Seconds a lease lasts without renewal (renewed every quarter of it): how long the directory of a
# trainer that died with its whole process tree stays closed to a retry.
TTL_S = 60.0
_ATTEMPTS = 3  # read-decide-write rounds before giving up on a lease that changes under every one


class LeaseHeld(RetryableError):
    """Another trainer holds the checkpoint directory's lease (or took it over while this one ran)."""


class _Conflict(Exception):
    """A conditional write lost against a concurrent one."""


def owner_id() -> str:
    """This job's lease owner: the same for every rank and every torchrun restart of the job.

    torchrun's agent is the parent of its workers and outlives their restarts; its rendezvous id tells
    two jobs apart even if a pid is reused (``--standalone`` makes one up per launch).
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return f"{socket.gethostname()}:{os.getppid()}:{os.environ['TORCHELASTIC_RUN_ID']}"
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    """The lease this job holds on one checkpoint directory (acquire with :meth:`acquire`).

    Only rank 0 talks to storage; on the other ranks every method is a no-op, and :meth:`acquire` and
    :meth:`check` raise the same error on every rank.
    """

    def __init__(self, uri: str, ctx: DistContext, *, config_hash: str, ttl_s: float, owner: str) -> None:
        self.uri = uri.rstrip("/")
        self.ctx = ctx
        self.config_hash = config_hash
        self.ttl_s = ttl_s
        self.owner = owner
        self.run_id: str | None = None  # MLflow run of an earlier attempt of this job (same config)
        self._store = _LeaseStore(self.uri)
        self._record: dict[str, Any] = {}
        self._token: str | None = None  # what our last write left on storage (S3 ETag)
        self._lost: str | None = None  # why the lease is no longer ours (set by the renewal thread)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def file_uri(self) -> str:
        return join(self.uri, LEASE_FILE)

    @classmethod
    def acquire(
        cls, uri: str, ctx: DistContext, *, config_hash: str, ttl_s: float = TTL_S, owner: str | None = None
    ) -> Lease:
        """Take the lease on ``uri`` (rank 0) and start renewing it; every rank raises :class:`LeaseHeld`
        if a live lease of another owner is there, or the storage error if it cannot be read or written."""
        lease = cls(uri, ctx, config_hash=config_hash, ttl_s=ttl_s, owner=owner or owner_id())
        failure: str | None = None
        if ctx.is_main:
            try:
                lease._take()
            except Exception as exc:
                error = exc if isinstance(exc, TrainerError) else _storage_error(lease.uri, exc)
                if not ctx.is_distributed:
                    raise error from exc
                failure = f"{type(error).__name__}:{error}"
        failure = distributed.broadcast_str(failure, ctx.device)
        if failure is not None:
            kind, message = failure.split(":", 1)
            raise {"LeaseHeld": LeaseHeld, "CheckpointError": CheckpointError}.get(kind, RetryableError)(
                message
            )
        if ctx.is_main:
            lease._renewer = threading.Thread(target=lease._renew_loop, name="lease-renewal", daemon=True)
            lease._renewer.start()
        return lease

    def record_run(self, run_id: str | None) -> None:
        """Write the MLflow run id into the lease now, so a restart from here on continues that run."""
        if not self.ctx.is_main or run_id is None or self._record.get("mlflow_run_id") == run_id:
            return
        try:
            with self._lock:
                self._record["mlflow_run_id"] = run_id
                self._write_ours()
        except Exception as exc:  # the renewal writes the whole record again within ttl_s / 4
            log.warning("could not record MLflow run %s in %s yet: %s", run_id, self.file_uri, exc)

    def check(self) -> None:
        """Raise :class:`LeaseHeld` on every rank if the lease is no longer this job's (a collective:
        call it at the same point on every rank, before writing to the directory)."""
        lost = distributed.broadcast_str(self._lost if self.ctx.is_main else None, self.ctx.device)
        if lost is not None:
            raise LeaseHeld(lost)

    def release(self, *, keep_run: bool = False) -> None:
        """Stop renewing and give the lease up: delete it, or with ``keep_run`` (a retry will follow)
        leave it released with its MLflow run id for the next attempt. Best effort; never raises."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if not self.ctx.is_main or self._lost is not None or not self._record:
            return
        try:
            with self._lock, self._store.exclusive():
                current, token = self._store.read()
                if not self._is_ours(current):
                    log.warning("lease %s is no longer ours (now %s); left alone", self.file_uri, current)
                    return
                if keep_run and self._record.get("mlflow_run_id"):
                    self._token = token
                    self._record.update(released=True, expires_at=time.time())
                    self._write_ours()
                else:
                    self._store.delete()
        except Exception:
            log.exception("could not release the lease %s (it expires by itself)", self.file_uri)

    # ---- rank 0 -----------------------------------------------------------------------------
    def _take(self) -> None:
        for _ in range(_ATTEMPTS):
            with self._lock, self._store.exclusive():
                current, token = self._store.read()
                if (
                    current is not None
                    and _live(current)
                    and current.get("owner") != self.owner
                    and not _holder_dead_here(current)
                ):
                    raise LeaseHeld(self._held_message(current))
                same_config = current is not None and current.get("config_hash") == self.config_hash
                now = time.time()
                self._record = {
                    "owner": self.owner,
                    "lease_id": uuid.uuid4().hex,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "pid_namespace": _pid_namespace(),
                    "acquired_at": now,
                    "expires_at": now + self.ttl_s,
                    "ttl_s": self.ttl_s,
                    "config_hash": self.config_hash,
                    # An earlier attempt's MLflow run, continued when it trained the same config.
                    "mlflow_run_id": current.get("mlflow_run_id") if current and same_config else None,
                    "released": False,
                }
                try:
                    self._token = self._store.write(self._record, token, create=current is None)
                except _Conflict:
                    continue  # someone wrote it between our read and our write: look again
                if not self._is_ours(self._store.read()[0]):
                    continue
            self.run_id = self._record["mlflow_run_id"]
            self._log_taken(current)
            return
        raise RetryableError(
            f"could not take the lease {self.file_uri}: it changed under each of {_ATTEMPTS} attempts"
        )

    def _log_taken(self, previous: dict[str, Any] | None) -> None:
        holder = (previous or {}).get("owner")
        if previous is None:
            log.info(
                "took the lease %s (it expires %.0f s after its last renewal)", self.file_uri, self.ttl_s
            )
        elif holder == self.owner:
            log.info("took back this job's lease %s (a torchrun restart)", self.file_uri)
        elif previous.get("released"):
            log.info("took the lease %s released by %s", self.file_uri, holder)
        elif _live(previous):
            log.warning("taking over the lease of %s on %s: its process on this host is gone", holder, self.uri)
        else:
            log.warning(
                "taking over the expired lease of %s on %s (expired %s)",
                holder,
                self.uri,
                _utc(previous.get("expires_at")),
            )
        if self.run_id is not None:
            log.info("continuing MLflow run %s of an earlier attempt (from the lease)", self.run_id)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                with self._lock, self._store.exclusive():
                    current, token = self._store.read()
                    if not self._is_ours(current):
                        holder = (current or {}).get("owner", "nobody")
                        self._lost = (
                            f"the lease {self.file_uri} was taken over by {holder} while this trainer ran "
                            f"(not renewed within {self.ttl_s:.0f} s?); this trainer stops before writing "
                            "another checkpoint (exit 75)"
                        )
                        log.error("%s", self._lost)
                        return
                    self._token = token
                    self._record["expires_at"] = time.time() + self.ttl_s
                    self._write_ours()
            except Exception as exc:
                if time.time() >= float(self._record.get("expires_at", 0)):
                    self._lost = f"the lease {self.file_uri} expired: renewing it failed ({exc})"
                    log.error("%s", self._lost)
                    return
                log.warning("renewing the lease %s failed (%s); retrying", self.file_uri, exc)

    def _write_ours(self) -> None:
        """Rewrite our record over our own last write (callers hold ``self._lock``)."""
        try:
            self._token = self._store.write(self._record, self._token, create=False)
        except _Conflict:
            raise RetryableError(f"the lease {self.file_uri} changed under this trainer") from None

    def _is_ours(self, record: dict[str, Any] | None) -> bool:
        return record is not None and record.get("lease_id") == self._record.get("lease_id")

    def _held_message(self, record: dict[str, Any]) -> str:
        return (
            f"checkpoint directory {self.uri} is leased by {record.get('owner')} until "
            f"{_utc(record.get('expires_at'))} (renewed while it trains): another trainer is using it - a "
            "duplicated task, or a worker of an earlier attempt still running. This attempt stops without "
            "touching it (exit 75, retryable); a retry after the lease expires continues from the last "
            f"checkpoint. If that trainer is known to be dead, delete {self.file_uri} to take over now."
        )


class _LeaseStore:
    """Reads and (conditionally) writes the lease object; see the module docstring for the guarantees."""

    def __init__(self, uri: str) -> None:
        self.fs, self.root = filesystem(uri)
        self.path = f"{self.root}/{LEASE_FILE}"
        self.local = isinstance(self.fs, LocalFileSystem)
        self.s3 = "s3" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every other process's read-decide-write (local directories: flock)."""
        if not self.local:
            yield
            return
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The record (None if absent; an unreadable one counts as expired) and its ETag on S3."""
        self.fs.invalidate_cache(self.path)
        token = None
        try:
            if self.s3:  # the ETag first: if the object changes in between, a write If-Match it fails
                token = self.fs.info(self.path).get("ETag")
            blob = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(blob)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            log.warning("%s is not a lease record; treating it as expired", self.path)
            return {"owner": "(unreadable)", "expires_at": 0}, token
        return record, token

    def write(self, record: dict[str, Any], token: str | None, *, create: bool) -> str | None:
        """Write ``record``: only if absent (``create``) or still at ``token``, where the store can tell.
        Returns the new ETag on S3; raises :class:`_Conflict` if the condition failed."""
        blob = json.dumps(record, indent=1, sort_keys=True).encode()
        if self.local:
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as stream:
                stream.write(blob)
            os.replace(tmp, self.path)
            return None
        if not self.s3:
            self.fs.pipe_file(self.path, blob)
            return None
        condition: dict[str, Any] = {"mode": "create"} if create else ({"IfMatch": token} if token else {})
        try:
            out = self.fs.pipe_file(self.path, blob, **condition)
        except FileExistsError as exc:  # s3fs: 412 Precondition Failed
            raise _Conflict(str(exc)) from exc
        except OSError as exc:  # older s3fs: 412 as EINVAL; 409 ConditionalRequestConflict as EBUSY
            if exc.errno in (errno.EINVAL, errno.EBUSY):
                raise _Conflict(str(exc)) from exc
            raise
        return out.get("ETag") if isinstance(out, dict) else None

    def delete(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


def _pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[4026531836]``): pids are comparable only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder_dead_here(record: dict[str, Any]) -> bool:
    """The holder ran on this host in this pid namespace, and its process is gone: the lease is stale
    however long it has left (a killed trainer cannot release it), so it can be taken over now.
    Containers share a host name, so the namespace is what makes the pid comparable."""
    namespace = _pid_namespace()
    if namespace is None or record.get("pid_namespace") != namespace or record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except (KeyError, TypeError, ValueError, PermissionError, OSError):
        return False
    return False


def _live(record: dict[str, Any]) -> bool:
    try:
        expires_at = float(record.get("expires_at", 0))
    except (TypeError, ValueError):
        return False
    return not record.get("released") and expires_at > time.time()


def _utc(timestamp: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(timestamp)))
    except (TypeError, ValueError):
        return "(unknown)"


def _storage_error(uri: str, exc: BaseException) -> TrainerError:
    # One owner for full / read-only / transient.
    from trainer.checkpoint.storage_errors import storage_error as classify

    return classify(uri, exc)
