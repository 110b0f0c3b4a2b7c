"""Checkpoints on object storage: torch.distributed.checkpoint (DCP) through fsspec, with a commit manifest.

Layout: ``{checkpoint.uri}/step-{N:08d}/`` holds the DCP files (tensors only: model, optimizer state,
per-rank RNG of torch, python's ``random`` and numpy's ``np.random``), ``trainer_state.json``
(counters, early-stopping state, scheduler, optimizer hyper-parameters, MLflow run id) and, written last
by rank 0, ``manifest.json`` with the sha256 and size of every other file, the step, config hash, world
size and dataset version. A step directory without a valid manifest (a JSON object of that shape) does
not exist as far as :meth:`CheckpointManager.latest` is concerned.

Saving never reads a file back: every byte DCP writes goes through a hashing stream, each rank's digests
travel to the coordinator with DCP's own write results, and rank 0 writes the manifest from them. With
``async_save`` the copy of the state (staging) also runs in the background: :meth:`CheckpointManager.save`
registers an optimizer step pre-hook, so the next ``optimizer.step()`` - the first thing that changes the
saved tensors - waits for the copy; the forward and backward in between overlap with it.

Loading reads each file whole, once, and checks its sha256 before DCP sees a byte of it. ``latest()``
verifies the newest candidate on rank 0 and keeps its bytes, which ``load()`` then uses on rank 0, so the
verification is the read. Nothing from storage is unpickled freely: tensors are read with
``torch.load(weights_only=True)`` by DCP, non-tensor state is JSON, and DCP's ``.metadata`` goes through
an allow-list unpickler, after its sha256 has been checked against the manifest. The manifest can be
rewritten by whoever can write the files, so the metadata is also checked to declare only tensors: a
"bytes" entry (which DCP would ``torch.load(weights_only=False)``) makes the step invalid, and the load
planner refuses bytes entries as well.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import random
import threading
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as _DcpFsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.storage import WriteResult

from trainer import distributed
from trainer.errors import CheckpointError, RetryableError, TrainerError
from trainer.storage import filesystem, join, storage_options

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from torch import nn
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import ReadItem, SavePlan, SavePlanner
    from torch.utils.hooks import RemovableHandle

    from trainer.distributed import DistContext

log = logging.getLogger(__name__)
T = TypeVar("T")

# A single-process run deliberately has no process group; DCP warns about that on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_STEP_PREFIX = "step-"
_DIGESTS_FQN = "__ctrain_file_digests__"  # marker write result carrying a rank's file digests


def step_dir_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:08d}"


def _basename(path: str | os.PathLike[str]) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


class _BytesItem:
    """Stands in for DCP's ``BytesStorageMetadata`` while unpickling, so the refusal can name the entry."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP ``.metadata`` that resolves only the classes a tensors-only checkpoint's metadata
    is made of. ``BytesStorageMetadata`` is not one of them: it declares an entry as a pickled object,
    which DCP's loader would ``torch.load(weights_only=False)``, i.e. run; it becomes an inert
    :class:`_BytesItem`, which :func:`_parse_metadata` refuses."""

    _ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            # CPython 3.11 up to 3.11.x (e.g. Debian's 3.11.2) pickles an Enum member as
            # getattr(EnumClass, "NAME"); later releases as EnumClass(value). Only that one use of
            # getattr is resolved, so a checkpoint written under either loads under the other.
            return self._enum_member
        if (module, name) in self._ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        if (module, name) == ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"):
            return _BytesItem
        raise pickle.UnpicklingError(f"checkpoint metadata references {module}.{name}, which is not allowed")

    @classmethod
    def _enum_member(cls, owner: object, name: object) -> enum.Enum:
        """``getattr(owner, name)`` only for an allow-listed Enum class and the name of one of its members."""
        allowed = (
            isinstance(owner, type)
            and issubclass(owner, enum.Enum)
            and (owner.__module__, owner.__qualname__) in cls._ALLOWED
        )
        if not allowed or not isinstance(name, str) or name not in owner.__members__:  # type: ignore[union-attr]
            what = getattr(owner, "__qualname__", type(owner).__name__)
            raise pickle.UnpicklingError(
                f"checkpoint metadata calls getattr({what}, {name!r}), which is not allowed (only an "
                "allow-listed Enum class and one of its member names are)"
            )
        return owner[name]  # type: ignore[index]


def _bytes_item_refused(fqn: str) -> str:
    return (
        f"checkpoint entry {fqn} is a bytes item (a pickled object, which DCP would load with "
        "torch.load(weights_only=False) and so run); ctrain checkpoints hold only tensors"
    )


def _parse_metadata(blob: bytes) -> Metadata:
    """DCP ``.metadata`` through the allow-list unpickler, checked to describe only tensors stored in
    plain files of the step directory (raises UnpicklingError for anything else)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

    try:
        metadata = _MetadataUnpickler(io.BytesIO(blob)).load()
    except pickle.UnpicklingError:
        raise
    except Exception as exc:  # truncated or garbage bytes surface as many exception types
        raise pickle.UnpicklingError(f"unreadable DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise pickle.UnpicklingError(f"checkpoint metadata is a {type(metadata).__name__}, not DCP Metadata")
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, _BytesItem):
            raise pickle.UnpicklingError(_bytes_item_refused(fqn))
        if not isinstance(entry, TensorStorageMetadata):
            raise pickle.UnpicklingError(f"checkpoint metadata entry {fqn} is a {type(entry).__name__}")
    storage = metadata.storage_data
    if not isinstance(storage, dict) or not all(
        isinstance(index, MetadataIndex)
        and isinstance(info, _StorageInfo)
        and _is_file_name(info.relative_path)
        and not info.transform_descriptors  # ctrain writes none; a zstd one could be a decompression bomb
        for index, info in storage.items()
    ):
        raise pickle.UnpicklingError(
            "checkpoint metadata's storage entries must name plain files of the step directory, untransformed"
        )
    return metadata


def _is_file_name(name: object) -> bool:
    """A plain file name in the step directory (no separator, not ``.``/``..``)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


class _MalformedManifest(ValueError):
    """``manifest.json`` is not the object :meth:`CheckpointManager._commit` writes (message: why)."""


# Fields of the manifest that reading relies on, and what each must be.
_MANIFEST_FIELDS: dict[str, tuple[type, str]] = {
    "step": (int, "an integer"),
    "world_size": (int, "an integer"),
    "config_hash": (str, "a string"),
    "dataset_version": (str, "a string"),
}


def _parse_manifest(blob: bytes, step: int) -> dict[str, Any]:
    """The manifest of ``step`` from its bytes; raises _MalformedManifest saying what is wrong."""
    try:
        manifest = json.loads(blob)
    except ValueError as exc:  # also undecodable bytes
        raise _MalformedManifest(f"is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise _MalformedManifest(f"is malformed (a JSON {_json_kind(manifest)}, not an object)")
    for key, (kind, expected) in _MANIFEST_FIELDS.items():
        if key not in manifest:
            raise _MalformedManifest(f"is malformed ({key} is missing)")
        value = manifest[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _MalformedManifest(
                f"is malformed ({key} is the {_json_kind(value)} {json.dumps(value)}, expected {expected})"
            )
    if manifest["step"] != step:
        raise _MalformedManifest(f"is malformed (step is {manifest['step']}, expected {step})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        _is_file_name(name) and isinstance(digest, str) for name, digest in files.items()
    ):
        raise _MalformedManifest(
            "is malformed (files must map file names of the step directory to sha256 digests)"
        )
    if ".metadata" not in files:
        raise _MalformedManifest("is malformed (files does not list .metadata)")
    return manifest


def _json_kind(value: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _parse_trainer_state(blob: bytes) -> dict[str, Any]:
    """``trainer_state.json`` from its bytes; raises ValueError unless it has the shape load relies on."""
    state = json.loads(blob)
    if not isinstance(state, dict) or not isinstance(state.get("loop"), dict):
        raise ValueError("is not an object with a loop object")
    if not isinstance(state.get("optimizer_param_groups"), list):
        raise ValueError("has no optimizer_param_groups list")
    return state


# ---- writing: hash every byte on its way out -----------------------------------------------------
class _HashingStream:
    """Write-only file wrapper that feeds every byte written into a sha256.

    ``torch.save`` issues dozens of small writes per tensor; they are gathered here and handed to the
    file (and the hash) in one piece at ``flush``/``close`` or every 1 MiB, which keeps the per-write
    cost of the file layers below out of the save.
    """

    _CHUNK = 1 << 20

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0  # bytes written so far (DCP opens each file fresh, so this is also tell())
        self._buffer = bytearray()

    def write(self, data: Any) -> int:
        view = memoryview(data)
        if view.nbytes >= self._CHUNK:
            self._drain()
            self._emit(view)
        else:
            self._buffer += view
            if len(self._buffer) >= self._CHUNK:
                self._drain()
        self.size += view.nbytes
        return view.nbytes

    def _emit(self, view: memoryview | bytearray) -> None:
        written = self.raw.write(view)
        if written is not None and written != memoryview(view).nbytes:
            raise OSError(errno.EIO, f"short write ({written} of {len(view)} bytes)")
        self.sha256.update(view)  # releases the GIL for large buffers

    def _drain(self) -> None:
        if self._buffer:
            self._emit(self._buffer)
            self._buffer = bytearray()

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._drain()  # into the file object; it reaches storage when the file is closed

    def close(self) -> None:
        self._drain()
        self.raw.close()

    def __getattr__(self, name: str) -> Any:  # fileno, closed, ...
        return getattr(self.raw, name)


class _HashingFileSystem(_DcpFsspecFileSystem):
    """DCP's fsspec filesystem, recording ``name -> (sha256, size)`` of every file it finishes writing."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as stream:
            hashing = _HashingStream(stream)
            yield hashing
            hashing.flush()  # DCP closes its data files itself, but not .metadata
        # Recorded only once the file is closed, i.e. flushed (local) or uploaded (S3).
        with self._lock:
            self.written[_basename(path)] = (hashing.sha256.hexdigest(), hashing.size)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        super().rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
        with self._lock:
            if _basename(path) in self.written:
                self.written[_basename(new_path)] = self.written.pop(_basename(path))


class _HashingWriter(FsspecWriter):
    """FsspecWriter whose files are hashed while written; after ``finish`` (on the coordinator)
    :attr:`files` holds ``name -> (sha256, size)`` for every rank's files and ``.metadata``."""

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(path, sync_files=False, **options)
        self.fs = _HashingFileSystem()
        self.path = self.fs.init_path(path, **options)
        self.files: dict[str, tuple[str, int]] = {}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        done = super().write_data(plan, planner)
        done.wait()
        # This rank's digests ride along with its write results to the coordinator (in memory, over
        # the process group), which strips them again in finish().
        digests = WriteResult(
            index=MetadataIndex(f"{_DIGESTS_FQN}{self.rank}"),
            size_in_bytes=0,
            storage_data=dict(self.fs.written),
        )
        future: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        future.set_result([*done.value(), digests])
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        kept = []
        for rank_results in results:
            kept.append([r for r in rank_results if not r.index.fqn.startswith(_DIGESTS_FQN)])
            for r in rank_results:
                if r.index.fqn.startswith(_DIGESTS_FQN):
                    self.files.update(r.storage_data)
        super().finish(metadata, kept)
        self.files[".metadata"] = self.fs.written[".metadata"]


# ---- reading: each file whole, once, checked against the manifest ------------------------------
class _VerifyingFileSystem(_DcpFsspecFileSystem):
    """DCP's fsspec filesystem for reading: a file is read whole and served only if its sha256 is the
    one in the manifest (bytes ``latest()`` already verified are served from ``verified``)."""

    def __init__(self, uri: str, expected: dict[str, str], verified: dict[str, bytes]) -> None:
        super().__init__()
        self.uri = uri
        self.expected = expected
        self.verified = verified

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        if "r" not in mode:
            raise CheckpointError(f"checkpoint {self.uri} is opened for reading only")
        name = _basename(path)
        if name not in self.expected:
            raise CheckpointError(f"checkpoint {self.uri}: {name} is not listed in its manifest; refused")
        blob = self.verified.get(name)
        if blob is None:
            assert self.fs is not None
            try:
                blob = self.fs.cat_file(os.fspath(path))
            except Exception as exc:
                raise _StorageReadError(f"reading {path} failed: {exc}") from exc
            if hashlib.sha256(blob).hexdigest() != self.expected[name]:
                raise CheckpointError(
                    f"checkpoint {self.uri}: {name} does not match its sha256 in manifest.json (corrupt); "
                    "delete this step directory to resume from the previous checkpoint"
                )
            self.verified[name] = blob
        yield io.BytesIO(blob)


class _StorageReadError(Exception):
    """Reading a checkpoint file from storage failed (as opposed to its verified bytes being unusable)."""


class _SafeReader(FsspecReader):
    """FsspecReader that verifies every file it reads and parses ``.metadata`` with the allow-list
    unpickler."""

    def __init__(self, uri: str, expected: dict[str, str], verified: dict[str, bytes]) -> None:
        options = storage_options(uri)
        super().__init__(uri, **options)
        self.fs = _VerifyingFileSystem(uri, expected, verified)
        self.path = self.fs.init_path(uri, **options)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _parse_metadata(stream.read())
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, minus bytes items: DCP would ``torch.load(weights_only=False)`` them.

    ``_parse_metadata`` already refuses metadata that declares one; this is the second lock, so no
    checkpoint path reaches that ``torch.load`` whatever the metadata check misses."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(_bytes_item_refused(read_item.dest_index.fqn))


@dataclass
class Verdict:
    """Result of verifying one checkpoint."""

    step: int
    valid: bool
    reason: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Pending:
    """A save in flight: its commit future and, when asynchronous, the future of the state copy."""

    step: int
    commit: Future[None]
    staging: Future[None] | None = None


class CheckpointManager:
    """save(step) / latest() / load(step) for one run's checkpoint directory, plus retention."""

    def __init__(
        self,
        uri: str,
        ctx: DistContext,
        *,
        config_hash: str,
        dataset_version: str,
        keep_last: int,
        keep_best: bool,
        async_save: bool,
        allow_mismatch: bool,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.ctx = ctx
        self.config_hash = config_hash
        self.dataset_version = dataset_version
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.async_save = async_save
        self.allow_mismatch = allow_mismatch
        self.fs, self.root = filesystem(self.uri)
        self.protected: set[int] = set()  # the step we resumed from: retention never deletes it
        self.events: list[str] = []  # skipped/removed checkpoints, for the MLflow run
        self.last_saved_step: int | None = None
        self.blocked_s = 0.0  # seconds the caller spent blocked by checkpointing (save + staging waits)
        self._pending: _Pending | None = None
        self._verified: tuple[int, dict[str, bytes]] | None = None  # rank 0: bytes latest() checked
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit")
        self._stager: DefaultStager | None = None  # kept: its staging buffers are reused save to save
        self._step_hooks: dict[int, RemovableHandle] = {}  # id(optimizer) -> its step pre-hook

    # ---- paths -------------------------------------------------------------------------------
    def step_uri(self, step: int) -> str:
        return join(self.uri, step_dir_name(step))

    def _step_path(self, step: int) -> str:
        return f"{self.root}/{step_dir_name(step)}"

    def steps_on_storage(self) -> list[int]:
        """Every step directory present (committed or not), ascending."""
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return []
        steps = []
        for entry in self.fs.ls(self.root, detail=False):
            name = _basename(entry)
            if name.startswith(_STEP_PREFIX) and name[len(_STEP_PREFIX) :].isdigit():
                steps.append(int(name[len(_STEP_PREFIX) :]))
        return sorted(steps)

    # ---- save --------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        best_step: int | None,
    ) -> str:
        """Write checkpoint ``step`` (``state`` = JSON-able trainer state); returns its URI.

        Synchronous: returns once the checkpoint is committed. Asynchronous: returns at once; the state
        is copied in the background and ``optimizer.step()`` waits for that copy (a step pre-hook), so
        nothing saved can change before it is copied; the files, the manifest and pruning follow in
        the background, and the next save (or :meth:`wait`) reports a failure on every rank.
        """
        self.wait()
        started = time.perf_counter()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        if self.async_save:
            # Parameters and optimizer state change only in optimizer.step(); buffers can change in a
            # forward (BatchNorm statistics, DDP's buffer broadcast), so those few are copied now.
            params = {p.data_ptr() for p in model.parameters()}
            model_sd = {k: v if v.data_ptr() in params else v.detach().clone() for k, v in model_sd.items()}
        tensors = {
            "model": model_sd,
            "optim": _tensor_leaves(optim_sd["state"]),
            "rng": _rng_state(self.ctx.rank),
        }
        trainer_state = json.dumps({**state, "optimizer_param_groups": optim_sd["param_groups"]}, indent=1)
        writer = _HashingWriter(self.step_uri(step), **storage_options(self.uri))
        group, no_dist = self.ctx.checkpoint_group, not self.ctx.is_distributed
        staging: Future[None] | None = None
        try:
            if self.async_save:
                response = dcp.async_save(
                    tensors,
                    storage_writer=writer,
                    process_group=group,
                    no_dist=no_dist,
                    async_stager=self._get_stager(),
                )
                staging, upload = response.staging_completion, response.upload_completion
                if id(optimizer) not in self._step_hooks:
                    self._step_hooks[id(optimizer)] = optimizer.register_step_pre_hook(
                        lambda *_: self.wait_for_staging()
                    )
            else:
                dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=no_dist)
                upload = Future()
                upload.set_result(None)
        except TrainerError:
            raise
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            raise _storage_error(self.step_uri(step), exc) from exc
        commit = self._committer.submit(self._commit, step, upload, writer, trainer_state.encode(), best_step)
        self._pending = _Pending(step, commit, staging)
        self.last_saved_step = step
        self.blocked_s += time.perf_counter() - started
        if not self.async_save:
            self.wait()
        return self.step_uri(step)

    def _get_stager(self) -> DefaultStager:
        if self._stager is None:
            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=cuda,
                    use_shared_memory=False,
                    use_async_staging=True,
                    use_non_blocking_copy=cuda,
                )
            )
        return self._stager

    def wait_for_staging(self) -> None:
        """Block until the pending async save has copied the state (then the tensors may change)."""
        pending = self._pending
        if pending is None or pending.staging is None:
            return
        started = time.perf_counter()
        try:
            pending.staging.result()
        finally:
            pending.staging = None
            self.blocked_s += time.perf_counter() - started

    def wait(self) -> None:
        """Block until the pending save is committed; every rank raises if it failed on any rank."""
        error: BaseException | None = None
        if self._pending is not None:
            try:
                self.wait_for_staging()
                started = time.perf_counter()
                self._pending.commit.result()
                self.blocked_s += time.perf_counter() - started
            except BaseException as exc:  # re-raised below once all ranks agree
                error = exc
            self._pending = None
        if distributed.any_rank(error is not None, self.ctx.device):
            if isinstance(error, TrainerError):
                raise error
            if error is None:
                raise RetryableError(f"checkpoint save under {self.uri} failed on another rank")
            raise _storage_error(self.uri, error) from error

    def drain(self) -> None:
        """On the failure path: let this rank's pending save finish, without collectives (peers may be
        gone). A save that fails here leaves no manifest, so it is never used."""
        if self._pending is not None:
            try:
                self.wait_for_staging()
                self._pending.commit.result()
            except Exception:
                log.exception("pending checkpoint save failed")
            self._pending = None
        self._shutdown()

    def close(self) -> None:
        """Finish the pending save and stop the background threads."""
        try:
            self.wait()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._committer.shutdown(wait=True)
        for hook in self._step_hooks.values():
            hook.remove()
        self._step_hooks.clear()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _commit(
        self,
        step: int,
        upload: Future[Any],
        writer: _HashingWriter,
        trainer_state: bytes,
        best_step: int | None,
    ) -> None:
        upload.result()
        if not self.ctx.is_main:
            return
        path = self._step_path(step)
        files = {
            **writer.files,
            TRAINER_STATE: (hashlib.sha256(trainer_state).hexdigest(), len(trainer_state)),
        }
        manifest = {
            "step": step,
            "files": {name: digest for name, (digest, _) in sorted(files.items())},
            "sizes": {name: size for name, (_, size) in sorted(files.items())},
            "config_hash": self.config_hash,
            "world_size": self.ctx.world_size,
            "dataset_version": self.dataset_version,
            "best_step": best_step,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        what = f"commit of {self.step_uri(step)}"
        _with_retries(lambda: self.fs.pipe_file(f"{path}/{TRAINER_STATE}", trainer_state), what)
        # The manifest is the commit marker: one small object written after every file it lists.
        _with_retries(
            lambda: self.fs.pipe_file(f"{path}/{MANIFEST}", json.dumps(manifest, indent=1).encode()), what
        )
        try:
            self._prune(best_step)
        except Exception:  # a failed prune leaves extra checkpoints, never a wrong one: carry on
            log.exception("pruning old checkpoints under %s failed", self.uri)

    def _prune(self, best_step: int | None) -> None:
        committed = [s for s in self.steps_on_storage() if self.fs.exists(f"{self._step_path(s)}/{MANIFEST}")]
        keep = set(committed[-self.keep_last :]) | self.protected
        if self.keep_best and best_step is not None:
            keep.add(best_step)
        for step in committed:
            if step not in keep:
                self.fs.rm(self._step_path(step), recursive=True)

    # ---- find and verify ---------------------------------------------------------------------
    def verify(self, step: int) -> Verdict:
        """Check the manifest exists and matches this step, every listed file has its sha256, and
        ``.metadata`` parses with the allow-list unpickler. The verified bytes are kept for ``load``."""
        path = self._step_path(step)
        try:
            manifest = _parse_manifest(self.fs.cat_file(f"{path}/{MANIFEST}"), step)
        except FileNotFoundError:
            return Verdict(step, False, "no manifest (save did not complete)")
        except _MalformedManifest as exc:
            return Verdict(step, False, f"{MANIFEST} {exc}")
        blobs: dict[str, bytes] = {}
        for name, expected in manifest["files"].items():
            try:
                blob = self.fs.cat_file(f"{path}/{name}")
            except FileNotFoundError:
                return Verdict(step, False, f"{name} listed in the manifest is missing", manifest)
            if hashlib.sha256(blob).hexdigest() != expected:
                return Verdict(step, False, f"{name} does not match its sha256 (corrupt)", manifest)
            blobs[name] = blob
        try:
            _parse_metadata(blobs[".metadata"])
        except pickle.UnpicklingError as exc:
            return Verdict(step, False, f".metadata refused: {exc}", manifest)
        if TRAINER_STATE in blobs:
            try:
                _parse_trainer_state(blobs[TRAINER_STATE])
            except ValueError as exc:
                return Verdict(step, False, f"{TRAINER_STATE} refused: {exc}", manifest)
        self._verified = (step, blobs)
        return Verdict(step, True, "", manifest)

    def latest(self) -> int | None:
        """Newest step with a valid manifest (decided on rank 0, agreed by all); invalid newer ones are
        skipped with a warning and recorded in :attr:`events`."""
        choice: int | None = None
        if self.ctx.is_main:
            self._verified = None
            for step in reversed(self.steps_on_storage()):
                verdict = self.verify(step)
                if verdict.valid:
                    choice = step
                    break
                message = f"checkpoint {self.step_uri(step)} skipped: {verdict.reason}"
                log.warning(message)
                self.events.append(message)
        agreed = distributed.broadcast_str(None if choice is None else str(choice), self.ctx.device)
        return None if agreed is None else int(agreed)

    def discard_after(self, step: int | None) -> None:
        """Prepare the directory for this run's saves: remove step directories newer than ``step``
        (orphans of killed saves, corrupt ones; the run would write those steps again), then check that
        the destination takes writes, so a read-only or full destination stops the run before it trains
        rather than at its first checkpoint."""

        def prepare() -> None:
            for newer in self.steps_on_storage():
                if step is None or newer > step:
                    self.fs.rm(self._step_path(newer), recursive=True)
                    self.events.append(f"checkpoint {self.step_uri(newer)} removed (newer than resume point)")
            probe = f"{self.root}/.write-probe-{uuid.uuid4().hex}"
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ctrain checks that checkpoints can be written here\n" * 64)
            self.fs.rm(probe)

        self._on_main(prepare)

    def _on_main(self, action: Callable[[], None]) -> None:
        """Run a storage action on rank 0; every rank raises the same error if it fails."""
        failure: str | None = None
        if self.ctx.is_main:
            try:
                action()
            except Exception as exc:
                error = exc if isinstance(exc, TrainerError) else _storage_error(self.uri, exc)
                failure = f"{'retryable' if isinstance(error, RetryableError) else 'terminal'}:{error}"
                if not self.ctx.is_distributed:
                    raise error from exc
        failure = distributed.broadcast_str(failure, self.ctx.device)
        if failure is not None:
            kind, message = failure.split(":", 1)
            raise (RetryableError if kind == "retryable" else CheckpointError)(message)

    # ---- load --------------------------------------------------------------------------------
    def check_compatible(self, manifest: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint written by another config, world size or dataset."""
        problems = []
        if manifest.get("config_hash") != self.config_hash:
            problems.append(f"config hash {manifest.get('config_hash')} != {self.config_hash}")
        if manifest.get("world_size") != self.ctx.world_size:
            problems.append(f"world size {manifest.get('world_size')} != {self.ctx.world_size}")
        if manifest.get("dataset_version") != self.dataset_version:
            problems.append(f"dataset version {manifest.get('dataset_version')} != {self.dataset_version}")
        if problems and not self.allow_mismatch:
            raise CheckpointError(
                f"checkpoint {self.step_uri(manifest['step'])} was written by a different run ("
                + "; ".join(problems)
                + "). Use a fresh checkpoint.uri, or set checkpoint.allow_mismatch=true to resume anyway."
            )

    def read_manifest(self, step: int) -> dict[str, Any]:
        """The manifest of ``step``, checked for shape (not against the files: loading does that)."""
        try:
            return _parse_manifest(self.fs.cat_file(f"{self._step_path(step)}/{MANIFEST}"), step)
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint {self.step_uri(step)} has no manifest.json: it was never committed; "
                "resume from latest() instead"
            ) from None
        except _MalformedManifest as exc:
            raise CheckpointError(
                f"checkpoint {join(self.step_uri(step), MANIFEST)} {exc}. Delete the step directory to resume "
                "from the previous checkpoint, or use a fresh checkpoint.uri"
            ) from None

    def load(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from ``step``; return the trainer state."""
        self.wait_for_staging()
        manifest = self.read_manifest(step)
        self.check_compatible(manifest)
        same_world = manifest.get("world_size") == self.ctx.world_size
        model_sd, optim_sd = get_state_dict(model, optimizer)
        tensors: dict[str, Any] = {"model": model_sd, "optim": _tensor_leaves(optim_sd["state"])}
        if same_world:  # RNG streams are per rank; after resharding each rank starts a fresh stream
            tensors["rng"] = _rng_state(self.ctx.rank)
        verified = self._dcp_load(step, manifest, tensors)
        blob = verified[TRAINER_STATE] if TRAINER_STATE in verified else self._read_state(step, manifest)
        try:
            state = _parse_trainer_state(blob)
        except ValueError as exc:
            raise CheckpointError(
                f"checkpoint {self.step_uri(step)} refused: {TRAINER_STATE} {exc}. Delete the step "
                "directory to resume from the previous checkpoint, or use a fresh checkpoint.uri"
            ) from None
        optim_sd["param_groups"] = state["optimizer_param_groups"]
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        if same_world:
            _set_rng_state(tensors["rng"], self.ctx.rank)
        self.protected.add(step)
        return state

    def _read_state(self, step: int, manifest: dict[str, Any]) -> bytes:
        blob = self.fs.cat_file(f"{self._step_path(step)}/{TRAINER_STATE}")
        if hashlib.sha256(blob).hexdigest() != manifest["files"].get(TRAINER_STATE):
            raise CheckpointError(
                f"checkpoint {self.step_uri(step)}: {TRAINER_STATE} does not match its sha256"
            )
        return blob

    def load_model(self, step: int, model: nn.Module) -> None:
        """Restore only the model weights of ``step`` (the final, best model)."""
        self.wait()
        sd = {"model": {k: v for k, v in _unwrap(model).state_dict().items()}}
        self._dcp_load(step, self.read_manifest(step), sd)
        _unwrap(model).load_state_dict(sd["model"])

    def _dcp_load(self, step: int, manifest: dict[str, Any], tensors: dict[str, Any]) -> dict[str, bytes]:
        """DCP-load ``tensors`` from ``step``, every file checked against ``manifest``; returns the
        verified bytes read (on rank 0 after ``latest()``: the ones it verified)."""
        verified: dict[str, bytes] = {}
        if self._verified is not None and self._verified[0] == step:
            verified = self._verified[1]
        self._verified = None  # served once; the memory goes with the load
        reader = _SafeReader(self.step_uri(step), manifest.get("files", {}), verified)
        try:
            reader.read_metadata()  # the refusal below is a terminal error, not a storage failure
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"checkpoint {self.step_uri(step)} refused: {exc}") from None
        except TrainerError:
            raise
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            raise _storage_error(self.step_uri(step), exc) from exc
        planner = _TensorsOnlyLoadPlanner(allow_partial_load=True)
        try:
            dcp.load(
                tensors,
                storage_reader=reader,
                planner=planner,
                process_group=self.ctx.checkpoint_group,
                no_dist=not self.ctx.is_distributed,
            )
        except (Exception, CheckpointException) as exc:
            causes = _causes(exc)
            terminal = next((c for c in causes if isinstance(c, TrainerError)), None)
            if terminal is not None:
                raise terminal from exc
            if any(isinstance(c, _StorageReadError) for c in causes):
                raise _storage_error(self.step_uri(step), exc) from exc
            # The bytes matched the manifest but do not load as this state: torch.load(weights_only=True)
            # refused an object, or shapes differ. Retrying cannot fix that.
            reason = next((c for c in causes if not isinstance(c, CheckpointException)), exc)
            raise CheckpointError(
                f"checkpoint {self.step_uri(step)} refused: its files do not load as this model's state "
                f"({type(reason).__name__}: {str(reason).splitlines()[0] if str(reason) else ''}). "
                "Delete this step directory, or use a fresh checkpoint.uri"
            ) from None
        return verified


def _with_retries(action: Callable[[], T], what: str, attempts: int = 4, first_delay_s: float = 0.5) -> T:
    """Run a storage action, retrying transient failures with exponential backoff."""
    for attempt in range(attempts - 1):
        try:
            return action()
        except Exception as exc:
            if isinstance(_storage_error("", exc), CheckpointError):
                raise
            delay = first_delay_s * 2**attempt
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
    return action()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _tensor_leaves(optim_state: dict[str, Any]) -> dict[str, Any]:
    """Tensor part of the FQN-keyed optimizer state (all of it is tensors for AdamW/SGD)."""
    return {
        fqn: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for fqn, s in optim_state.items()
    }


def _rng_state(rank: int) -> dict[str, torch.Tensor]:
    """This rank's global RNG states (torch, CUDA, python's ``random``, numpy's legacy ``np.random``) as
    tensors, so they are checkpointed like the rest (and never pickled)."""
    state = {
        f"torch_rank{rank}": torch.get_rng_state(),
        f"python_rank{rank}": _python_rng_tensor(random.getstate()),
        f"numpy_rank{rank}": _numpy_rng_tensor(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state[f"cuda_rank{rank}"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor], rank: int) -> None:
    torch.set_rng_state(state[f"torch_rank{rank}"])
    random.setstate(_python_rng_state(state[f"python_rank{rank}"]))
    np.random.set_state(_numpy_rng_state(state[f"numpy_rank{rank}"]))
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state[f"cuda_rank{rank}"])


# Python's Mersenne Twister state is (version, 625 words, cached gauss or None); numpy's legacy one is
# ("MT19937", 624 words, position, has_gauss, cached_gaussian). Both become one int64 tensor each, a
# cached normal as its float64 bits.
def _float_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float64).view(torch.int64).item())


def _bits_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int64).view(torch.float64).item())


def _python_rng_tensor(state: tuple[Any, ...]) -> torch.Tensor:
    version, words, gauss = state
    cached = [0, 0] if gauss is None else [1, _float_bits(gauss)]
    return torch.tensor([version, *words, *cached], dtype=torch.int64)


def _python_rng_state(tensor: torch.Tensor) -> tuple[Any, ...]:
    values = tensor.tolist()
    version, words, (has_gauss, gauss) = values[0], tuple(values[1:-2]), values[-2:]
    return version, words, _bits_float(gauss) if has_gauss else None


def _numpy_rng_tensor(state: tuple[Any, ...]) -> torch.Tensor:
    _, words, position, has_gauss, gauss = state  # the legacy global RandomState is always MT19937
    return torch.tensor([*words.tolist(), position, has_gauss, _float_bits(gauss)], dtype=torch.int64)


def _numpy_rng_state(tensor: torch.Tensor) -> tuple[Any, ...]:
    values = tensor.tolist()
    words = np.array(values[:-3], dtype=np.uint32)
    return "MT19937", words, values[-3], values[-2], _bits_float(values[-1])


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def _storage_error(uri: str, exc: BaseException) -> TrainerError:
    """A failed storage operation as the error the run ends with.

    A full or read-only destination (anywhere in the cause chain, or in any rank's failure inside DCP's
    CheckpointException) is terminal: retrying cannot help, and training on without checkpoints would
    lose the run. Anything else - endpoint unreachable, timeouts, throttling - is retryable: the
    uncommitted checkpoint has no manifest, and a rerun resumes from the last one.
    """
    for cause in _causes(exc):
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


def _causes(exc: BaseException) -> list[BaseException]:
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
