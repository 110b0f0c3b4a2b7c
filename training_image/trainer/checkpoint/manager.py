"""The checkpoint manager: save / load (resume) / latest / retention for one run's checkpoint directory.

With ``async_save`` the copy of the state (staging) runs in the background: the manager registers an
optimizer step pre-hook, so the next ``optimizer.step()`` - the first thing that changes the saved
tensors - waits for the copy; the forward and backward in between overlap with it. Files, then
``trainer_state.json``, then ``manifest.json`` (the commit marker) are written by a commit thread, then
old checkpoints are pruned. ``latest()`` verifies the newest candidate on rank 0 and keeps its bytes,
which ``restore()`` then uses on rank 0, so the verification is the read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer import distributed
from trainer.checkpoint.integrity import (
    MANIFEST,
    STEP_PREFIX,
    TRAINER_STATE,
    HashingWriter,
    MalformedManifest,
    SafeReader,
    StorageReadError,
    TensorsOnlyLoadPlanner,
    Verdict,
    basename,
    parse_manifest,
    parse_trainer_state,
    step_dir_name,
    verify_step,
)
from trainer.checkpoint.state import rng_state, set_rng_state, tensor_leaves, unwrap
from trainer.checkpoint.storage_errors import causes, storage_error, with_retries
from trainer.errors import CheckpointError, RetryableError, TrainerError
from trainer.storage import filesystem, join, storage_options

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from torch import nn
    from torch.utils.hooks import RemovableHandle

    from trainer.distributed import DistContext

log = logging.getLogger(__name__)

# A single-process run deliberately has no process group; DCP warns about that on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class _Pending:
    """A save in flight: its commit future and, when asynchronous, the future of the state copy."""

    step: int
    commit: Future[None]
    staging: Future[None] | None = None


class Stateful(Protocol):
    """A JSON-able piece of the loop's state (loop counters, LR scheduler): saved in trainer_state.json."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointManager:
    """One run's checkpoint directory behind four calls: :meth:`load` (resume), :meth:`save`,
    :meth:`wait`, :meth:`close`.

    What a checkpoint holds is registered once, here: the model and optimizer (tensors, through DCP),
    ``states`` (JSON-able objects with ``state_dict()``/``load_state_dict()``: the loop's counters, the
    LR scheduler; the sampler's position is part of the loop counters) and, always, this rank's RNG
    streams. Ordering rules (the next ``optimizer.step()`` waits for an async save's copy, the manifest
    is written last, retention never deletes the resume point) live in here, not in the caller.
    """

    def __init__(
        self,
        uri: str,
        ctx: DistContext,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        states: Mapping[str, Stateful] | None = None,
        config_hash: str,
        dataset_version: str,
        keep_last: int = 2,
        keep_best: bool = True,
        async_save: bool = True,
        allow_mismatch: bool = False,
        resume: bool = True,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.ctx = ctx
        self.model = model
        self.optimizer = optimizer
        self.states = dict(states or {})
        self.config_hash = config_hash
        self.dataset_version = dataset_version
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.async_save = async_save
        self.allow_mismatch = allow_mismatch
        self.resume = resume
        self.fs, self.root = filesystem(self.uri)
        self.protected: set[int] = set()  # the step we resumed from: retention never deletes it
        self.events: list[str] = []  # skipped/removed checkpoints, for the MLflow run
        self.last_saved_step: int | None = None
        self.blocked_s = 0.0  # seconds the caller spent blocked by checkpointing (save + staging waits)
        self._pending: _Pending | None = None
        self._verified: tuple[int, dict[str, bytes]] | None = None  # rank 0: bytes latest() checked
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit")
        self._stager: DefaultStager | None = None  # kept: its staging buffers are reused save to save
        # optimizer.step() is the first thing that changes saved tensors: it waits for an async copy.
        self._step_hook: RemovableHandle | None = (
            optimizer.register_step_pre_hook(lambda *_: self.wait_for_staging()) if async_save else None
        )

    # ---- the contract ------------------------------------------------------------------------
    def load(self) -> int | None:
        """Resume: restore everything registered from the latest valid checkpoint (when ``resume`` is
        on), then prepare the directory for this run's saves (:meth:`discard_after`). Returns the step
        resumed from, or None for a fresh start."""
        step = self.latest() if self.resume else None
        if step is not None:
            self.restore(step)
        self.discard_after(step)
        return step

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
            name = basename(entry)
            if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX) :].isdigit():
                steps.append(int(name[len(STEP_PREFIX) :]))
        return sorted(steps)

    # ---- save --------------------------------------------------------------------------------
    def save(self, step: int, best_step: int | None = None) -> str:
        """Write checkpoint ``step`` of everything registered; returns its URI. ``best_step`` (the
        checkpoint holding the best weights) is kept by retention.

        Synchronous: returns once the checkpoint is committed. Asynchronous: returns at once; the state
        is copied in the background and ``optimizer.step()`` waits for that copy (a step pre-hook), so
        nothing saved can change before it is copied; the files, the manifest and pruning follow in
        the background, and the next save (or :meth:`wait`) reports a failure on every rank.
        """
        model, optimizer = self.model, self.optimizer
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
            "optim": tensor_leaves(optim_sd["state"]),
            "rng": rng_state(self.ctx.rank),
        }
        state = {name: obj.state_dict() for name, obj in self.states.items()}
        trainer_state = json.dumps(
            {**state, "config_hash": self.config_hash, "optimizer_param_groups": optim_sd["param_groups"]},
            indent=1,
        )
        writer = HashingWriter(self.step_uri(step), **storage_options(self.uri))
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
            else:
                dcp.save(tensors, storage_writer=writer, process_group=group, no_dist=no_dist)
                upload = Future()
                upload.set_result(None)
        except TrainerError:
            raise
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            raise storage_error(self.step_uri(step), exc) from exc
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
            raise storage_error(self.uri, error) from error

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
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _commit(
        self,
        step: int,
        upload: Future[Any],
        writer: HashingWriter,
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
        with_retries(lambda: self.fs.pipe_file(f"{path}/{TRAINER_STATE}", trainer_state), what)
        # The manifest is the commit marker: one small object written after every file it lists.
        with_retries(
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
        verdict, blobs = verify_step(self.fs, self._step_path(step), step)
        if verdict.valid:
            self._verified = (step, blobs)
        return verdict

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
                error = exc if isinstance(exc, TrainerError) else storage_error(self.uri, exc)
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
            return parse_manifest(self.fs.cat_file(f"{self._step_path(step)}/{MANIFEST}"), step)
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint {self.step_uri(step)} has no manifest.json: it was never committed; "
                "resume from latest() instead"
            ) from None
        except MalformedManifest as exc:
            raise CheckpointError(
                f"checkpoint {join(self.step_uri(step), MANIFEST)} {exc}. Delete the step directory to resume "
                "from the previous checkpoint, or use a fresh checkpoint.uri"
            ) from None

    def restore(self, step: int) -> dict[str, Any]:
        """Restore the model, optimizer, registered states and this rank's RNG from ``step`` (verified
        as it is read); returns the trainer state as saved."""
        model, optimizer = self.model, self.optimizer
        self.wait_for_staging()
        manifest = self.read_manifest(step)
        self.check_compatible(manifest)
        same_world = manifest.get("world_size") == self.ctx.world_size
        model_sd, optim_sd = get_state_dict(model, optimizer)
        tensors: dict[str, Any] = {"model": model_sd, "optim": tensor_leaves(optim_sd["state"])}
        if same_world:  # RNG streams are per rank; after resharding each rank starts a fresh stream
            tensors["rng"] = rng_state(self.ctx.rank)
        verified = self._dcp_load(step, manifest, tensors)
        blob = verified[TRAINER_STATE] if TRAINER_STATE in verified else self._read_state(step, manifest)
        try:
            state = parse_trainer_state(blob)
        except ValueError as exc:
            raise CheckpointError(
                f"checkpoint {self.step_uri(step)} refused: {TRAINER_STATE} {exc}. Delete the step "
                "directory to resume from the previous checkpoint, or use a fresh checkpoint.uri"
            ) from None
        optim_sd["param_groups"] = state["optimizer_param_groups"]
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        for name, obj in self.states.items():
            if state.get(name) is not None:
                obj.load_state_dict(state[name])
        if same_world:
            set_rng_state(tensors["rng"], self.ctx.rank)
        self.protected.add(step)
        return state

    def _read_state(self, step: int, manifest: dict[str, Any]) -> bytes:
        blob = self.fs.cat_file(f"{self._step_path(step)}/{TRAINER_STATE}")
        if hashlib.sha256(blob).hexdigest() != manifest["files"].get(TRAINER_STATE):
            raise CheckpointError(
                f"checkpoint {self.step_uri(step)}: {TRAINER_STATE} does not match its sha256"
            )
        return blob

    def load_model(self, step: int) -> None:
        """Restore only the model weights of ``step`` (the final, best model)."""
        model = self.model
        self.wait()
        sd = {"model": {k: v for k, v in unwrap(model).state_dict().items()}}
        self._dcp_load(step, self.read_manifest(step), sd)
        unwrap(model).load_state_dict(sd["model"])

    def _dcp_load(self, step: int, manifest: dict[str, Any], tensors: dict[str, Any]) -> dict[str, bytes]:
        """DCP-load ``tensors`` from ``step``, every file checked against ``manifest``; returns the
        verified bytes read (on rank 0 after ``latest()``: the ones it verified)."""
        verified: dict[str, bytes] = {}
        if self._verified is not None and self._verified[0] == step:
            verified = self._verified[1]
        self._verified = None  # served once; the memory goes with the load
        reader = SafeReader(self.step_uri(step), manifest.get("files", {}), verified)
        try:
            reader.read_metadata()  # the refusal below is a terminal error, not a storage failure
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"checkpoint {self.step_uri(step)} refused: {exc}") from None
        except TrainerError:
            raise
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            raise storage_error(self.step_uri(step), exc) from exc
        planner = TensorsOnlyLoadPlanner(allow_partial_load=True)
        try:
            dcp.load(
                tensors,
                storage_reader=reader,
                planner=planner,
                process_group=self.ctx.checkpoint_group,
                no_dist=not self.ctx.is_distributed,
            )
        except (Exception, CheckpointException) as exc:
            chain = causes(exc)
            terminal = next((c for c in chain if isinstance(c, TrainerError)), None)
            if terminal is not None:
                raise terminal from exc
            if any(isinstance(c, StorageReadError) for c in chain):
                raise storage_error(self.step_uri(step), exc) from exc
            # The bytes matched the manifest but do not load as this state: torch.load(weights_only=True)
            # refused an object, or shapes differ. Retrying cannot fix that.
            reason = next((c for c in chain if not isinstance(c, CheckpointException)), exc)
            raise CheckpointError(
                f"checkpoint {self.step_uri(step)} refused: its files do not load as this model's state "
                f"({type(reason).__name__}: {str(reason).splitlines()[0] if str(reason) else ''}). "
                "Delete this step directory, or use a fresh checkpoint.uri"
            ) from None
        return verified
