"""Checkpoint integrity: the commit manifest, sha256 of every byte written and read, the safe unpickler.

Saving never reads a file back: every byte DCP writes goes through a hashing stream
(:class:`HashingWriter`), each rank's digests travel to the coordinator with DCP's own write results,
and rank 0 writes the manifest from them.

Loading reads each file whole, once, and checks its sha256 before DCP sees a byte of it
(:class:`SafeReader`). Nothing from storage is unpickled freely: tensors are read with
``torch.load(weights_only=True)`` by DCP, non-tensor state is JSON, and DCP's ``.metadata`` goes through
an allow-list unpickler (:func:`parse_metadata`), after its sha256 has been checked against the
manifest. The manifest can be rewritten by whoever can write the files, so the metadata is also checked
to declare only tensors: a "bytes" entry (which DCP would ``torch.load(weights_only=False)``) makes the
step invalid, and the load planner refuses bytes entries as well.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import io
import json
import os
import pickle
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as _DcpFsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult

from trainer.errors import CheckpointError
from trainer.storage import storage_options

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import ReadItem, SavePlan, SavePlanner

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
STEP_PREFIX = "step-"
_DIGESTS_FQN = "__ctrain_file_digests__"  # marker write result carrying a rank's file digests


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def basename(path: str | os.PathLike[str]) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


class _BytesItem:
    """Stands in for DCP's ``BytesStorageMetadata`` while unpickling, so the refusal can name the entry."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP ``.metadata`` that resolves only the classes a tensors-only checkpoint's metadata
    is made of. ``BytesStorageMetadata`` is not one of them: it declares an entry as a pickled object,
    which DCP's loader would ``torch.load(weights_only=False)``, i.e. run; it becomes an inert
    :class:`_BytesItem`, which :func:`parse_metadata` refuses."""

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


def bytes_item_refused(fqn: str) -> str:
    return (
        f"checkpoint entry {fqn} is a bytes item (a pickled object, which DCP would load with "
        "torch.load(weights_only=False) and so run); ctrain checkpoints hold only tensors"
    )


def parse_metadata(blob: bytes) -> Metadata:
    """DCP ``.metadata`` through the allow-list unpickler, checked to describe only tensors stored in
    plain files of the step directory (raises UnpicklingError for anything else)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

    try:
        metadata = MetadataUnpickler(io.BytesIO(blob)).load()
    except pickle.UnpicklingError:
        raise
    except Exception as exc:  # truncated or garbage bytes surface as many exception types
        raise pickle.UnpicklingError(f"unreadable DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise pickle.UnpicklingError(f"checkpoint metadata is a {type(metadata).__name__}, not DCP Metadata")
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, _BytesItem):
            raise pickle.UnpicklingError(bytes_item_refused(fqn))
        if not isinstance(entry, TensorStorageMetadata):
            raise pickle.UnpicklingError(f"checkpoint metadata entry {fqn} is a {type(entry).__name__}")
    storage = metadata.storage_data
    if not isinstance(storage, dict) or not all(
        isinstance(index, MetadataIndex)
        and isinstance(info, _StorageInfo)
        and is_file_name(info.relative_path)
        and not info.transform_descriptors  # ctrain writes none; a zstd one could be a decompression bomb
        for index, info in storage.items()
    ):
        raise pickle.UnpicklingError(
            "checkpoint metadata's storage entries must name plain files of the step directory, untransformed"
        )
    return metadata


def is_file_name(name: object) -> bool:
    """A plain file name in the step directory (no separator, not ``.``/``..``)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


class MalformedManifest(ValueError):
    """``manifest.json`` is not the object :meth:`CheckpointManager._commit` writes (message: why)."""


# Fields of the manifest that reading relies on, and what each must be.
_MANIFEST_FIELDS: dict[str, tuple[type, str]] = {
    "step": (int, "an integer"),
    "world_size": (int, "an integer"),
    "config_hash": (str, "a string"),
    "dataset_version": (str, "a string"),
}


def parse_manifest(blob: bytes, step: int) -> dict[str, Any]:
    """The manifest of ``step`` from its bytes; raises MalformedManifest saying what is wrong."""
    try:
        manifest = json.loads(blob)
    except ValueError as exc:  # also undecodable bytes
        raise MalformedManifest(f"is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise MalformedManifest(f"is malformed (a JSON {_json_kind(manifest)}, not an object)")
    for key, (kind, expected) in _MANIFEST_FIELDS.items():
        if key not in manifest:
            raise MalformedManifest(f"is malformed ({key} is missing)")
        value = manifest[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MalformedManifest(
                f"is malformed ({key} is the {_json_kind(value)} {json.dumps(value)}, expected {expected})"
            )
    if manifest["step"] != step:
        raise MalformedManifest(f"is malformed (step is {manifest['step']}, expected {step})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        is_file_name(name) and isinstance(digest, str) for name, digest in files.items()
    ):
        raise MalformedManifest(
            "is malformed (files must map file names of the step directory to sha256 digests)"
        )
    if ".metadata" not in files:
        raise MalformedManifest("is malformed (files does not list .metadata)")
    return manifest


def _json_kind(value: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def parse_trainer_state(blob: bytes) -> dict[str, Any]:
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
            self.written[basename(path)] = (hashing.sha256.hexdigest(), hashing.size)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        super().rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
        with self._lock:
            if basename(path) in self.written:
                self.written[basename(new_path)] = self.written.pop(basename(path))


class HashingWriter(FsspecWriter):
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
        name = basename(path)
        if name not in self.expected:
            raise CheckpointError(f"checkpoint {self.uri}: {name} is not listed in its manifest; refused")
        blob = self.verified.get(name)
        if blob is None:
            assert self.fs is not None
            try:
                blob = self.fs.cat_file(os.fspath(path))
            except Exception as exc:
                raise StorageReadError(f"reading {path} failed: {exc}") from exc
            if hashlib.sha256(blob).hexdigest() != self.expected[name]:
                raise CheckpointError(
                    f"checkpoint {self.uri}: {name} does not match its sha256 in manifest.json (corrupt); "
                    "delete this step directory to resume from the previous checkpoint"
                )
            self.verified[name] = blob
        yield io.BytesIO(blob)


class StorageReadError(Exception):
    """Reading a checkpoint file from storage failed (as opposed to its verified bytes being unusable)."""


class SafeReader(FsspecReader):
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
            metadata = parse_metadata(stream.read())
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, minus bytes items: DCP would ``torch.load(weights_only=False)`` them.

    ``parse_metadata`` already refuses metadata that declares one; this is the second lock, so no
    checkpoint path reaches that ``torch.load`` whatever the metadata check misses."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(bytes_item_refused(read_item.dest_index.fqn))


@dataclass
class Verdict:
    """Result of verifying one checkpoint."""

    step: int
    valid: bool
    reason: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)



def verify_step(fs: Any, path: str, step: int) -> tuple[Verdict, dict[str, bytes]]:
    """Verify the step directory ``path`` on ``fs``: the manifest exists and is for this step, every
    file it lists has its sha256, ``.metadata`` parses with the allow-list unpickler and declares only
    tensors, ``trainer_state.json`` has its shape. Returns the verdict and the verified bytes."""
    try:
        manifest = parse_manifest(fs.cat_file(f"{path}/{MANIFEST}"), step)
    except FileNotFoundError:
        return Verdict(step, False, "no manifest (save did not complete)"), {}
    except MalformedManifest as exc:
        return Verdict(step, False, f"{MANIFEST} {exc}"), {}
    blobs: dict[str, bytes] = {}
    for name, expected in manifest["files"].items():
        try:
            blob = fs.cat_file(f"{path}/{name}")
        except FileNotFoundError:
            return Verdict(step, False, f"{name} listed in the manifest is missing", manifest), {}
        if hashlib.sha256(blob).hexdigest() != expected:
            return Verdict(step, False, f"{name} does not match its sha256 (corrupt)", manifest), {}
        blobs[name] = blob
    try:
        parse_metadata(blobs[".metadata"])
    except pickle.UnpicklingError as exc:
        return Verdict(step, False, f".metadata refused: {exc}", manifest), {}
    if TRAINER_STATE in blobs:
        try:
            parse_trainer_state(blobs[TRAINER_STATE])
        except ValueError as exc:
            return Verdict(step, False, f"{TRAINER_STATE} refused: {exc}", manifest), {}
    return Verdict(step, True, "", manifest), blobs
