"""Benchmark (not a test): what ctrain's checkpoints cost the training loop, and how fast they move bytes.

    flock /tmp/ctrain-bench.lock .venv/bin/python bench/checkpoint.py          # about 4 minutes, 2 cores
    flock /tmp/ctrain-bench.lock .venv/bin/python bench/checkpoint.py --quick  # smoke run, smaller state

Every save and load goes through the trainer's own ``trainer.checkpoint.CheckpointManager`` (DCP through
fsspec, sha256 of every byte as it is written, manifest written last, retention) exactly as
``trainer.loop`` calls it, in one process without a process group (how the trainer runs at world size
1). Two states, both ``trainer.model:mlp`` with AdamW, trained on synthetic data:

- large: 256 features -> 2048 x 3 -> 1 (8.9M parameters) + AdamW moments = 107 MB per checkpoint; an
  epoch is 30 steps of batch 64.
- fraud: the default config (configs/default.yaml): 9 features -> 64 -> 32 -> 1, dropout 0.1, batch 512,
  an epoch of 270 steps (the demo's 138k training rows: 46 of its 60 days x 3,000 transactions).

1. Blocking time per save, synchronous vs asynchronous, on ``file://`` and ``s3://``: what the loop
   waits for. Synchronous: the whole ``save()``. Asynchronous: ``save()`` plus the wait for the state
   copy that the next ``optimizer.step()`` does (the copy runs in the background during that step's
   forward and backward). Each save starts with the previous one committed (in the loop it is, one
   epoch earlier); the first save per manager is warm-up and dropped.
2. Overhead at the default interval (one async checkpoint per epoch, keep_last=2 + best): the same
   training runs with and without checkpoints, alternating round by round; the first epoch of each run
   is dropped, so every measured epoch of the checkpointed run also carries the previous save's
   background write. ``overhead_share`` = median epoch time with / without - 1. These runs use one
   intra-op thread, as each trainer rank does under torchrun on this 2-core machine; here the other core
   is free for the background write, while in a 2-rank run it trains the other rank.
3. Throughput to ``file://`` (a temp dir) and ``s3://`` (a ``moto_server`` subprocess on 127.0.0.1, path
   style, dummy credentials), large state: a synchronous ``save()`` next to a plain copy of the same
   bytes as one file (``shutil.copy`` / ``fs.put_file``); a resume from a new manager (``latest()``,
   which reads and verifies every file, then ``restore()`` from those bytes) next to a plain read of them
   (``fs.cat_file``).

Medians over ``--repeats``. The table is printed first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from trainer.checkpoint import CheckpointManager
from trainer.distributed import DistContext
from trainer.model import ModelSpec, mlp
from trainer.storage import filesystem

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from torch import nn

CTX = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
TARGET_ASYNC_OVER_SYNC = 0.10
TARGET_OVERHEAD_SHARE = 0.02
BUCKET = "ctrain-bench"
SEED = 0


@dataclass(frozen=True)
class Sizes:
    """One state to checkpoint and the loop around it."""

    name: str
    features: int
    hidden: tuple[int, ...]
    dropout: float
    batch: int
    steps_per_epoch: int
    epochs: int  # per run; the first is warm-up
    rounds: int  # alternating with/without-checkpoint runs
    repeats: int = 3  # saves/loads per throughput measurement
    blocking_saves: int = 5  # measured saves per mode on file:// (after one warm-up)
    blocking_saves_s3: int = 3  # the same on s3://, where each save takes seconds


LARGE = Sizes(
    "large", features=256, hidden=(2048,) * 3, dropout=0.0, batch=64, steps_per_epoch=30, epochs=3, rounds=3
)
FRAUD = Sizes(
    "fraud", features=9, hidden=(64, 32), dropout=0.1, batch=512, steps_per_epoch=270, epochs=4, rounds=3
)
QUICK_LARGE = Sizes(
    "large", features=256, hidden=(512,) * 3, dropout=0.0, batch=64, steps_per_epoch=10, epochs=2, rounds=1,
    repeats=2, blocking_saves=3, blocking_saves_s3=2,
)  # fmt: skip
QUICK_FRAUD = Sizes(
    "fraud", features=9, hidden=(64, 32), dropout=0.1, batch=512, steps_per_epoch=60, epochs=2, rounds=1
)


# ---- model and training ----------------------------------------------------------------------------
def build(sizes: Sizes) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and AdamW after one step, so the optimizer state (both moments) exists."""
    torch.manual_seed(SEED)
    spec = ModelSpec(
        num_features=sizes.features,
        num_outputs=1,
        feature_names=tuple(f"f{i}" for i in range(sizes.features)),
        feature_mean=torch.zeros(sizes.features),
        feature_std=torch.ones(sizes.features),
    )
    model = mlp(spec, hidden_sizes=sizes.hidden, dropout=sizes.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x, y = synthetic(sizes.batch, sizes.features)
    train_step(model, optimizer, x, y)
    return model, optimizer


def synthetic(rows: int, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(rows, features, generator=generator)
    return x, (x[:, :4].sum(1) + 0.5 * torch.randn(rows, generator=generator) > 1.5).float()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()  # with an async save pending, this first waits for the state copy (a pre-hook)


def train_run(sizes: Sizes, uri: str | None) -> tuple[list[float], float]:
    """Epoch times (train steps + the epoch-end ``save()`` call) of one run from a fresh model,
    checkpointing asynchronously under ``uri`` (None: no checkpoints), and the seconds the loop was
    blocked by checkpointing during those epochs (the final wait for the last save, once per run, is not
    part of any epoch)."""
    model, optimizer = build(sizes)
    manager = new_manager(uri, model, optimizer, async_save=True) if uri is not None else None
    x, y = synthetic(sizes.steps_per_epoch * sizes.batch, sizes.features)
    generator = torch.Generator().manual_seed(SEED)
    times, step = [], 0
    for epoch in range(sizes.epochs):
        started = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        for idx in order.split(sizes.batch):
            train_step(model, optimizer, x[idx], y[idx])
            step += 1
        if manager is not None:
            manager.states["loop"].load_state_dict({"epoch": epoch + 1})
            manager.save(step, best_step=step)
        times.append(time.perf_counter() - started)
    blocked = manager.blocked_s if manager is not None else 0.0
    if manager is not None:
        manager.close()
    return times, blocked


class LoopCounters:
    """The JSON state a bench checkpoint carries beside the tensors (the trainer's is its LoopState)."""

    def __init__(self) -> None:
        self.epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]


def new_manager(
    uri: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, async_save: bool
) -> CheckpointManager:
    """A manager of ``model`` and ``optimizer`` with the default config's retention (keep_last=2, keep_best)."""
    return CheckpointManager(
        uri,
        CTX,
        model=model,
        optimizer=optimizer,
        states={"loop": LoopCounters()},
        config_hash="bench",
        dataset_version="synthetic",
        keep_last=2,
        keep_best=True,
        async_save=async_save,
        allow_mismatch=False,
    )


# ---- measurements ----------------------------------------------------------------------------------
@dataclass
class Blocking:
    """Medians per save on one backend: seconds the loop is blocked (sync, async) and async until committed."""

    sync_s: float
    async_s: float
    commit_s: float

    @property
    def ratio(self) -> float:
        return self.async_s / self.sync_s


def blocking(sizes: Sizes, uri: str, saves: int) -> Blocking:
    """Time ``saves`` saves per mode (after one warm-up), each followed by one training step."""
    model, optimizer = build(sizes)
    x, y = synthetic(sizes.batch, sizes.features)
    medians = {}
    for async_save in (False, True):
        manager = new_manager(
            f"{uri}/{'async' if async_save else 'sync'}", model, optimizer, async_save=async_save
        )
        blocked, committed = [], []
        for step in range(1, saves + 2):
            manager.wait()
            before, started = manager.blocked_s, time.perf_counter()
            manager.save(step)
            train_step(model, optimizer, x, y)  # async: waits for the state copy before it updates
            blocked.append(manager.blocked_s - before)
            manager.wait()
            committed.append(time.perf_counter() - started)
        manager.close()
        medians[async_save] = statistics.median(blocked[1:]), statistics.median(committed[1:])
    return Blocking(sync_s=medians[False][0], async_s=medians[True][0], commit_s=medians[True][1])


@dataclass
class Overhead:
    """Epoch seconds without and with one async checkpoint per epoch (medians and fastest)."""

    plain_s: float
    checkpointed_s: float
    fastest_plain_s: float
    fastest_checkpointed_s: float
    blocked_s: float  # per epoch: save() + the staging wait in the next optimizer.step()

    @property
    def share(self) -> float:
        return self.checkpointed_s / self.plain_s - 1

    @property
    def fastest_share(self) -> float:
        """From the fastest epochs, which load from other processes can only make slower."""
        return self.fastest_checkpointed_s / self.fastest_plain_s - 1


OVERHEAD_THREADS = 1  # torchrun gives each of the trainer's ranks OMP_NUM_THREADS=1


def overhead(sizes: Sizes, workdir: Path) -> Overhead:
    """Alternating runs without and with checkpoints, at one intra-op thread like a trainer rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(OVERHEAD_THREADS)
    try:
        return _overhead(sizes, workdir)
    finally:
        torch.set_num_threads(threads)


def _overhead(sizes: Sizes, workdir: Path) -> Overhead:
    plain, checkpointed, blocked = [], [], []
    for round_ in range(sizes.rounds):
        plain += train_run(sizes, None)[0][1:]
        times, blocked_s = train_run(sizes, f"file://{workdir / f'loop-{sizes.name}-{round_}'}")
        checkpointed += times[1:]
        blocked.append(blocked_s / sizes.epochs)
    return Overhead(
        statistics.median(plain),
        statistics.median(checkpointed),
        min(plain),
        min(checkpointed),
        statistics.median(blocked),
    )


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


@dataclass
class Throughput:
    """Save/resume seconds next to plain copy/read seconds for one storage backend."""

    nbytes: int
    save_s: float
    copy_s: float
    resume_s: float
    read_s: float


def throughput(sizes: Sizes, uri: str, blob: Path | None, workdir: Path) -> tuple[Throughput, Path]:
    """Measure one backend; ``blob`` (one file holding a checkpoint's bytes) is made on the first call."""
    model, optimizer = build(sizes)
    manager = new_manager(uri, model, optimizer, async_save=False)
    steps = iter(range(1, 1000))
    manager.save(next(steps))  # warm-up
    save_s = timed(lambda: manager.save(next(steps)), sizes.repeats)
    manager.close()
    step = manager.last_saved_step
    assert step is not None
    fs, step_path = manager.fs, f"{manager.root}/{manager.step_uri(step).rsplit('/', 1)[-1]}"
    nbytes = sum(fs.du(step_path, total=False).values())
    if blob is None:
        blob = workdir / "blob.bin"
        with blob.open("wb") as out:
            for name in sorted(fs.ls(step_path, detail=False)):
                out.write(fs.cat_file(name))

    def resume() -> None:
        fresh = new_manager(uri, model, optimizer, async_save=False)
        found = fresh.latest()
        assert found == step, f"latest() found {found}, expected {step}"
        fresh.restore(found)
        fresh.close()

    resume_s = timed(resume, sizes.repeats)
    copy_path = f"{manager.root}/plain-copy.bin"
    if uri.startswith("file://"):
        copy_s = timed(lambda: shutil.copy(blob, copy_path), sizes.repeats)
    else:
        copy_s = timed(lambda: fs.put_file(str(blob), copy_path), sizes.repeats)
    read_s = timed(lambda: fs.cat_file(copy_path), sizes.repeats)
    return Throughput(nbytes, save_s, copy_s, resume_s, read_s), blob


def state_mb(sizes: Sizes) -> tuple[int, float]:
    """Parameters and checkpoint megabytes (parameters, buffers and AdamW's two moments, float32)."""
    model, _ = build(sizes)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    return params, (3 * params + buffers) * 4 / 1e6


# ---- S3 on loopback ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server in a subprocess (so it does not share this process's GIL); yields a bucket URI."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.1)
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
                "CTRAIN_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            }
        )
        uri = f"s3://{BUCKET}/checkpoints"
        fs, _ = filesystem(uri)
        fs.mkdir(BUCKET)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---- main ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args()
    large, fraud = (QUICK_LARGE, QUICK_FRAUD) if args.quick else (LARGE, FRAUD)
    workdir = Path(tempfile.mkdtemp(prefix="ctrain-bench-ckpt-"))
    try:
        report(large, fraud, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(large: Sizes, fraud: Sizes, workdir: Path) -> None:
    params, _ = state_mb(large)
    fraud_params, fraud_mb = state_mb(fraud)

    file_blocking = blocking(large, f"file://{workdir / 'blocking'}", large.blocking_saves)
    fraud_blocking = blocking(fraud, f"file://{workdir / 'blocking-fraud'}", large.blocking_saves)
    over = {sizes.name: overhead(sizes, workdir) for sizes in (large, fraud)}
    local, blob = throughput(large, f"file://{workdir / 'tp'}", None, workdir)
    with moto_s3() as s3_uri:
        s3, _ = throughput(large, s3_uri, blob, workdir)
        s3_blocking = blocking(large, f"{s3_uri}/blocking", large.blocking_saves_s3)

    mb = local.nbytes / 1e6
    big = over["large"]
    result = {
        "async_over_sync_blocking": round(file_blocking.ratio, 4),
        "async_over_sync_blocking_s3": round(s3_blocking.ratio, 4),
        "async_over_sync_blocking_fraud": round(fraud_blocking.ratio, 4),
        "overhead_share": round(over["fraud"].share, 4),
        "overhead_share_large": round(big.share, 4),
        "overhead_share_fastest": round(over["fraud"].fastest_share, 4),
        "overhead_share_large_fastest": round(big.fastest_share, 4),
        "blocking_share": round(over["fraud"].blocked_s / over["fraud"].plain_s, 4),
        "blocking_share_large": round(big.blocked_s / big.plain_s, 4),
        "save_over_copy_file": round(local.save_s / local.copy_s, 3),
        "save_over_copy_s3": round(s3.save_s / s3.copy_s, 3),
        "load_over_copy_file": round(local.resume_s / local.read_s, 3),
        "load_over_copy_s3": round(s3.resume_s / s3.read_s, 3),
        "sync_blocking_s": {
            "file": round(file_blocking.sync_s, 4),
            "s3": round(s3_blocking.sync_s, 4),
            "fraud_file": round(fraud_blocking.sync_s, 5),
        },
        "async_blocking_s": {
            "file": round(file_blocking.async_s, 4),
            "s3": round(s3_blocking.async_s, 4),
            "fraud_file": round(fraud_blocking.async_s, 5),
        },
        "async_commit_s": {"file": round(file_blocking.commit_s, 4), "s3": round(s3_blocking.commit_s, 4)},
        "epoch_s": {name: round(o.plain_s, 3) for name, o in over.items()},
        "epoch_with_checkpoint_s": {name: round(o.checkpointed_s, 3) for name, o in over.items()},
        "break_even_epoch_s_large": round(
            max(big.checkpointed_s - big.plain_s, 0) / TARGET_OVERHEAD_SHARE, 1
        ),
        "checkpoint_mb": {"large": round(mb, 1), "fraud": round(fraud_mb, 3)},
        "params": {"large": params, "fraud": fraud_params},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "overhead_threads": OVERHEAD_THREADS,
    }

    print(
        f"large: MLP {large.features}->{'x'.join(map(str, large.hidden))}->1, {params / 1e6:.1f}M params + AdamW "
        f"= {mb:.1f} MB per checkpoint; epoch = {large.steps_per_epoch} steps x batch {large.batch}"
    )
    print(
        f"fraud: default config, MLP {fraud.features}->{'x'.join(map(str, fraud.hidden))}->1, {fraud_params} params "
        f"= {fraud_mb * 1000:.0f} KB per checkpoint; epoch = {fraud.steps_per_epoch} steps x batch {fraud.batch}"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, one process, file:// on the local disk"
    )
    rule = "-" * 100
    print(rule)
    print(f"{'blocking per save (loop waits)':<48}{'seconds':>10}{'ratio':>12}{'target':>12}{'met':>8}")
    for name, measured in (
        ("large file", file_blocking),
        ("large s3", s3_blocking),
        ("fraud file", fraud_blocking),
    ):
        print(f"{'  ' + name + ': sync save()':<48}{measured.sync_s:>10.4f}")
        print(f"{'  ' + name + ': async save() + copy wait in next step':<48}{measured.async_s:>10.4f}")
        print(f"{'  ' + name + ': async, until committed (background)':<48}{measured.commit_s:>10.4f}")
        met = measured.ratio <= TARGET_ASYNC_OVER_SYNC
        print(
            f"{'  ' + name + ': async / sync':<48}{'':>10}{measured.ratio:>12.3f}"
            f"{'<= ' + str(TARGET_ASYNC_OVER_SYNC):>12}{'yes' if met else 'NO':>8}"
        )
    print(rule)
    print(
        f"{'overhead, 1 async checkpoint/epoch, 1 thread':<48}{'seconds':>10}{'share':>12}{'target':>12}{'met':>8}"
    )
    for name, o in over.items():
        print(f"{'  ' + name + ': epoch without checkpoints':<48}{o.plain_s:>10.3f}")
        print(f"{'  ' + name + ': epoch with checkpoint':<48}{o.checkpointed_s:>10.3f}")
        print(
            f"{'  ' + name + ': of which the loop was blocked':<48}{o.blocked_s:>10.4f}{o.blocked_s / o.plain_s:>12.4f}"
        )
        met = o.share <= TARGET_OVERHEAD_SHARE
        print(
            f"{'  ' + name + ': overhead (with / without - 1)':<48}{o.checkpointed_s - o.plain_s:>10.3f}"
            f"{o.share:>12.4f}{'<= ' + str(TARGET_OVERHEAD_SHARE):>12}{'yes' if met else 'NO':>8}"
        )
        print(
            f"{'  ' + name + ': same, fastest epochs':<48}{o.fastest_checkpointed_s - o.fastest_plain_s:>10.3f}"
            f"{o.fastest_share:>12.4f}"
        )
    print(rule)
    print(
        f"{'throughput, large state':<30}{'ctrain s':>10}{'MB/s':>9}{'plain s':>10}{'MB/s':>9}{'ratio':>9}  plain op"
    )
    for name, t, plain_op in (("file", local, "shutil.copy"), ("s3 (moto)", s3, "fs.put_file")):
        rows = (
            (f"save   {name}", t.save_s, t.copy_s, plain_op),
            (f"resume {name}", t.resume_s, t.read_s, "fs.cat_file"),
        )
        for label, ours, ref, op in rows:
            print(
                f"{label:<30}{ours:>10.3f}{mb / ours:>9.0f}{ref:>10.3f}{mb / ref:>9.0f}{ours / ref:>9.2f}  {op}"
            )
    print(
        "(save = sync save(): DCP write hashed on the fly + manifest; resume = latest() verifying + load())"
    )
    print(
        f"large state: overhead_share would be <= {TARGET_OVERHEAD_SHARE} for epochs of at least "
        f"{result['break_even_epoch_s_large']} s; overhead_share in the JSON is the default fraud config's"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
