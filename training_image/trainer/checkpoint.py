"""Checkpoints on object storage: torch.distributed.checkpoint (DCP) through fsspec, with a commit manifest.

Layout: ``{checkpoint.uri}/step-{N:08d}/`` holds the DCP files (tensors only: model, optimizer state,
per-rank RNG), ``trainer_state.json`` (counters, early-stopping state, scheduler, optimizer
hyper-parameters, MLflow run id) and, written last by rank 0, ``manifest.json`` with the sha256 of
every other file, the step, config hash, world size and dataset version. A step directory without a
valid manifest does not exist as far as :meth:`CheckpointManager.latest` is concerned.

Nothing from storage is unpickled freely: tensors are read with ``torch.load(weights_only=True)`` by
DCP, non-tensor state is JSON, and DCP's ``.metadata`` goes through an allow-list unpickler, after its
sha256 has been checked against the manifest.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import pickle
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer import distributed
from trainer.errors import CheckpointError, RetryableError
from trainer.storage import filesystem, join, storage_options

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn
    from torch.distributed.checkpoint.metadata import Metadata

    from trainer.distributed import DistContext

log = logging.getLogger(__name__)
T = TypeVar("T")

# A single-process run deliberately has no process group; DCP warns about that on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_STEP_PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:08d}"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP ``.metadata`` that resolves only the classes DCP's metadata is made of."""

    _ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
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
        if (module, name) in self._ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata references {module}.{name}, which is not allowed")


class _SafeReader(FsspecReader):
    """FsspecReader whose metadata is read with the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@dataclass
class Verdict:
    """Result of verifying one checkpoint."""

    step: int
    valid: bool
    reason: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)


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
        self._pending: Future[None] | None = None
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit")

    # ---- paths -------------------------------------------------------------------------------
    def step_uri(self, step: int) -> str:
        return join(self.uri, step_dir_name(step))

    def _step_path(self, step: int) -> str:
        return f"{self.root}/{step_dir_name(step)}"

    def steps_on_storage(self) -> list[int]:
        """Every step directory present (committed or not), ascending."""
        if not self.fs.exists(self.root):
            return []
        steps = []
        for entry in self.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
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

        With async_save only the copy of the tensors blocks; the manifest is written by a commit
        thread once every rank's files are on storage, and only then are old checkpoints pruned.
        """
        self.wait()
        path = self._step_path(step)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        tensors = {
            "model": model_sd,
            "optim": _tensor_leaves(optim_sd["state"]),
            "rng": _rng_state(self.ctx.rank),
        }
        try:
            if self.ctx.is_main:
                # A directory at this step can only be a leftover of an abandoned attempt: start clean.
                if self.fs.exists(path):
                    self.fs.rm(path, recursive=True)
                self.fs.makedirs(path, exist_ok=True)
                state = {**state, "optimizer_param_groups": optim_sd["param_groups"]}
                self.fs.pipe_file(f"{path}/{TRAINER_STATE}", json.dumps(state, indent=1).encode())
        except (CheckpointError, RetryableError):
            raise
        except Exception as exc:
            raise _storage_error(self.step_uri(step), exc) from exc
        distributed.barrier()
        writer = FsspecWriter(self.step_uri(step), sync_files=False, **storage_options(self.uri))
        group, no_dist = self.ctx.checkpoint_group, not self.ctx.is_distributed
        try:
            if self.async_save:
                response = dcp.async_save(
                    tensors, storage_writer=writer, process_group=group, no_dist=no_dist
                )
                # Training may only change the tensors once they are copied (staged).
                staging = getattr(response, "staging_completion", None)
                if staging is not None:
                    staging.result()
                upload: Future[Any] = getattr(response, "upload_completion", response)
            else:
                dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=no_dist)
                upload = Future()
                upload.set_result(None)
        except (CheckpointError, RetryableError):
            raise
        except Exception as exc:
            raise _storage_error(self.step_uri(step), exc) from exc
        self._pending = self._committer.submit(self._commit, step, upload, best_step)
        self.last_saved_step = step
        if not self.async_save:
            self.wait()
        return self.step_uri(step)

    def wait(self) -> None:
        """Block until the pending save is committed; every rank raises if it failed on any rank."""
        error: BaseException | None = None
        if self._pending is not None:
            try:
                self._pending.result()
            except BaseException as exc:  # re-raised below once all ranks agree
                error = exc
            self._pending = None
        if distributed.any_rank(error is not None, self.ctx.device):
            if isinstance(error, CheckpointError | RetryableError):
                raise error
            if error is None:
                raise RetryableError(f"checkpoint save under {self.uri} failed on another rank")
            raise _storage_error(self.uri, error) from error

    def drain(self) -> None:
        """On the failure path: let this rank's pending save finish, without collectives (peers may be
        gone). A save that fails here leaves no manifest, so it is never used."""
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:
                log.exception("pending checkpoint save failed")
            self._pending = None
        self._committer.shutdown(wait=True)

    def close(self) -> None:
        """Finish the pending save and stop the commit thread."""
        try:
            self.wait()
        finally:
            self._committer.shutdown(wait=True)

    def _commit(self, step: int, upload: Future[Any], best_step: int | None) -> None:
        upload.result()
        if not self.ctx.is_main:
            return
        _with_retries(lambda: self._write_manifest(step, best_step), f"commit of {self.step_uri(step)}")
        try:
            self._prune(best_step)
        except Exception:  # a failed prune leaves extra checkpoints, never a wrong one: carry on
            log.exception("pruning old checkpoints under %s failed", self.uri)

    def _write_manifest(self, step: int, best_step: int | None) -> None:
        path = self._step_path(step)
        self.fs.invalidate_cache(path)
        files = {}
        for entry in sorted(self.fs.ls(path, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name != MANIFEST:
                files[name] = _sha256(self.fs, entry)
        manifest = {
            "step": step,
            "files": files,
            "config_hash": self.config_hash,
            "world_size": self.ctx.world_size,
            "dataset_version": self.dataset_version,
            "best_step": best_step,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # The manifest is the commit marker: one small object written after every file it lists.
        self.fs.pipe_file(f"{path}/{MANIFEST}", json.dumps(manifest, indent=1).encode())

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
        """Check the manifest exists, matches this run, and every listed file has its sha256."""
        path = self._step_path(step)
        try:
            manifest = json.loads(self.fs.cat_file(f"{path}/{MANIFEST}"))
        except FileNotFoundError:
            return Verdict(step, False, "no manifest (save did not complete)")
        except ValueError:
            return Verdict(step, False, "manifest.json is not valid JSON")
        files = manifest.get("files")
        if manifest.get("step") != step or not isinstance(files, dict) or ".metadata" not in files:
            return Verdict(step, False, "manifest.json is malformed", manifest)
        for name, expected in files.items():
            try:
                actual = _sha256(self.fs, f"{path}/{name}")
            except FileNotFoundError:
                return Verdict(step, False, f"{name} listed in the manifest is missing", manifest)
            if actual != expected:
                return Verdict(step, False, f"{name} does not match its sha256 (corrupt)", manifest)
        try:
            self._read_metadata(step)
        except pickle.UnpicklingError as exc:
            return Verdict(step, False, f".metadata refused: {exc}", manifest)
        return Verdict(step, True, "", manifest)

    def _read_metadata(self, step: int) -> Metadata:
        """Parse DCP's ``.metadata`` with the allow-list unpickler (raises UnpicklingError)."""
        try:
            return _MetadataUnpickler(
                io.BytesIO(self.fs.cat_file(f"{self._step_path(step)}/.metadata"))
            ).load()
        except pickle.UnpicklingError:
            raise
        except Exception as exc:  # truncated or garbage bytes surface as many exception types
            raise pickle.UnpicklingError(f"unreadable DCP metadata ({type(exc).__name__}: {exc})") from None

    def latest(self) -> int | None:
        """Newest step with a valid manifest (decided on rank 0, agreed by all); invalid newer ones are
        skipped with a warning and recorded in :attr:`events`."""
        choice: int | None = None
        if self.ctx.is_main:
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
        """Remove step directories newer than ``step`` (orphans of killed saves, corrupt ones): the run
        continues from ``step`` and would write those steps again."""
        if self.ctx.is_main:
            for newer in self.steps_on_storage():
                if step is None or newer > step:
                    self.fs.rm(self._step_path(newer), recursive=True)
                    self.events.append(f"checkpoint {self.step_uri(newer)} removed (newer than resume point)")
        distributed.barrier()

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
        return json.loads(self.fs.cat_file(f"{self._step_path(step)}/{MANIFEST}"))

    def load(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from ``step``; return the trainer state."""
        manifest = self.read_manifest(step)
        self.check_compatible(manifest)
        same_world = manifest.get("world_size") == self.ctx.world_size
        state = json.loads(self.fs.cat_file(f"{self._step_path(step)}/{TRAINER_STATE}"))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        tensors: dict[str, Any] = {"model": model_sd, "optim": _tensor_leaves(optim_sd["state"])}
        if same_world:  # RNG streams are per rank; after resharding each rank starts a fresh stream
            tensors["rng"] = _rng_state(self.ctx.rank)
        self._dcp_load(step, tensors)
        optim_sd["param_groups"] = state["optimizer_param_groups"]
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        if same_world:
            _set_rng_state(tensors["rng"], self.ctx.rank)
        self.protected.add(step)
        return state

    def load_model(self, step: int, model: nn.Module) -> None:
        """Restore only the model weights of ``step`` (the final, best model)."""
        self.wait()
        sd = {"model": {k: v for k, v in _unwrap(model).state_dict().items()}}
        self._dcp_load(step, sd)
        _unwrap(model).load_state_dict(sd["model"])

    def _dcp_load(self, step: int, tensors: dict[str, Any]) -> None:
        try:
            self._read_metadata(step)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"checkpoint {self.step_uri(step)} refused: {exc}") from None
        reader = _SafeReader(self.step_uri(step), **storage_options(self.uri))
        planner = DefaultLoadPlanner(allow_partial_load=True)
        try:
            dcp.load(
                tensors,
                storage_reader=reader,
                planner=planner,
                process_group=self.ctx.checkpoint_group,
                no_dist=not self.ctx.is_distributed,
            )
        except (CheckpointError, RetryableError):
            raise
        except Exception as exc:
            raise _storage_error(self.step_uri(step), exc) from exc


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
    state = {f"torch_rank{rank}": torch.get_rng_state()}
    if torch.cuda.is_available():
        state[f"cuda_rank{rank}"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor], rank: int) -> None:
    torch.set_rng_state(state[f"torch_rank{rank}"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state[f"cuda_rank{rank}"])


def _sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _storage_error(uri: str, exc: BaseException) -> Exception:
    """A failed storage operation as the error the run ends with.

    Permission and space problems (anywhere in the cause chain, or in any rank's failure inside DCP's
    CheckpointException) are terminal; anything else - endpoint unreachable, timeouts, throttling - is
    retryable: the uncommitted checkpoint has no manifest, and a rerun resumes from the last one.
    """
    for cause in _causes(exc):
        if isinstance(cause, PermissionError) or getattr(cause, "errno", None) in (errno.ENOSPC, errno.EROFS):
            return CheckpointError(f"checkpoint destination {uri} is not writable: {cause}")
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
        failures = getattr(current, "failures", None)  # torch's CheckpointException: rank -> error
        if isinstance(failures, dict):
            stack += [f for f in failures.values() if isinstance(f, BaseException)]
    return found
