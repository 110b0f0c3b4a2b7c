"""Process-group setup from the torchrun environment, and the few collectives the loop needs.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them the trainer runs as a single
process with no process group (so a 1-process run pays nothing for distribution).
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from torch import nn

    from trainer.config import DistributedConfig

log = logging.getLogger(__name__)

_POLL_S = 0.05  # store polling interval of wait_done


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # A separate gloo group for checkpoint collectives: async saves run them in a background
    # thread, and sharing the training group would interleave them with DDP's all-reduces.
    checkpoint_group: dist.ProcessGroup | None = None
    # The rendezvous key-value store: lets ranks coordinate without collectives (failure path).
    store: dist.Store | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init(backend: str = "auto", timeout_s: float = 120.0) -> DistContext:
    """Initialise the process group if torchrun started us; pick the device for this rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistContext(rank=0, local_rank=0, world_size=1, device=device)
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store = _attempt_store(rank, world_size, timeout)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if cuda else None,
        )
    checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)
    return DistContext(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        device=device,
        checkpoint_group=checkpoint_group,
        store=store,
    )


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store for this torchrun attempt, under a key prefix of its own.

    torchrun shares one TCPStore across restarts and the default ``env://`` init uses it without a
    prefix, so after a restart a rank can read the address a dead peer published in the previous
    attempt and wait on it until the timeout. Prefixing by ``TORCHELASTIC_RESTART_COUNT`` keeps each
    attempt's keys apart.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=rank == 0 and not agent_hosts_store,
        timeout=timeout,
        multi_tenant=True,
    )
    return dist.PrefixStore(f"ctrain/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def wrap_model(model: nn.Module, ctx: DistContext, cfg: DistributedConfig) -> nn.Module:
    """``model`` under DDP with the configured options (the model itself in a single process)."""
    if not ctx.is_distributed:
        return model
    # broadcast_buffers=False: re-sending buffers before every forward is a collective per step,
    # and the default model's buffers (feature scaling) never change. A user model with running
    # statistics (BatchNorm) should use SyncBatchNorm; rank 0's copy is the one checkpointed.
    return DistributedDataParallel(
        model,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        broadcast_buffers=False,
        find_unused_parameters=cfg.find_unused_parameters,
        static_graph=cfg.static_graph,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view,
        bucket_cap_mb=cfg.bucket_cap_mb,
    )


_UNUSED_INDICES = re.compile(r"Parameter indices which did not receive grad for rank \d+: ([\d ]+)")


@contextmanager
def explained_ddp_errors(model: nn.Module, factory: str) -> Iterator[None]:
    """Turn DDP's "parameters were not used in producing loss" error (raised at the forward after the
    step that left them without a gradient) into a ConfigError naming the parameters and the setting."""
    try:
        yield
    except RuntimeError as exc:
        if "find_unused_parameters=True" not in str(exc):
            raise
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        found = _UNUSED_INDICES.search(str(exc))
        unused = [names[int(i)] for i in found.group(1).split() if int(i) < len(names)] if found else []
        raise ConfigError(
            f"model.factory={factory}: the model has parameters that received no gradient in a training "
            f"step{' (' + ', '.join(unused) + ')' if unused else ''}, which DDP refuses by default. Set "
            "distributed.find_unused_parameters=true (or distributed.static_graph=true when the same "
            f"parameters are unused in every step). DDP said: {str(exc).splitlines()[0]}"
        ) from None


def shutdown() -> None:
    """Tear down the process group (safe to call when none exists)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank: every rank gets the same answer, so none hangs."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_str(value: str | None, device: torch.device) -> str | None:
    """Send a string from rank 0 to every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def signal_done(ctx: DistContext, key: str) -> None:
    """Rank 0 marks ``key`` done in the store (no collective: peers may be in any state)."""
    if ctx.store is not None:
        ctx.store.set(key, "1")


def wait_done(ctx: DistContext, key: str, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for rank 0 to mark ``key`` done; give up silently after that.

    Polls rather than blocking in ``store.wait``: a signal handler cannot run while the process is inside
    that C++ call, so a SIGTERM (torchrun stopping the group after losing rank 0, which will never mark
    the key) would wait out torchrun's grace period and be SIGKILLed. Here the handler's exception ends
    the wait at once.
    """
    if ctx.store is None:
        return
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.store.check([key]):
            if time.monotonic() >= deadline:
                log.warning("rank 0 did not confirm %r within %.0f s", key, timeout_s)
                return
            time.sleep(_POLL_S)
    except Exception as exc:  # rank 0 is gone, or we are being stopped: exiting now is all that is left
        log.warning("stopped waiting for rank 0 to confirm %r: %s", key, exc)


def from_main(ctx: DistContext, key: str, compute: Callable[[], str | None], timeout_s: float = 900) -> str | None:
    """Rank 0 runs ``compute`` and every rank gets its result, passed through the rendezvous store rather
    than a collective: a check that takes a while on rank 0 (an export, cold imports) does not run
    into ``distributed.timeout_s`` on the ranks waiting for it."""
    if ctx.store is None:
        return compute()
    if ctx.is_main:
        value = compute()
        ctx.store.set(key, "" if value is None else f"={value}")
        return value
    deadline = time.monotonic() + timeout_s
    while not ctx.store.check([key]):  # polled, so a SIGTERM ends the wait (see wait_done)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"rank 0 did not report {key!r} within {timeout_s:.0f} s")
        time.sleep(_POLL_S)
    value = ctx.store.get(key).decode()
    return value[1:] if value else None


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()
