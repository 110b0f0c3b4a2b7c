"""The six checkpoint fault-injection tests of issue 4, each on real 2-process gloo runs (torchrun).

1. SIGKILL of one rank mid-epoch: torchrun restarts, the run resumes exactly, one pass per epoch; also
   for a model that draws from python's and numpy's global RNG.
2. Kill during a save (data files written, manifest not): that step is skipped and cleaned up.
3. A flipped byte / truncated file in the newest checkpoint: detected by checksum, previous one used.
4. The S3 endpoint goes away during a save: retryable exit, latest stays committed, a rerun resumes.
5. A read-only or full destination: the run stops with a clear, terminal error; nothing half-committed.
6. A pickle-bearing checkpoint (in ``.metadata``, a tensor file, or a bytes entry the metadata declares):
   refused, its payload never runs.

The reference is the uninterrupted run of the same config and seed (the ``finished`` fixture, or a run
of the test's own model); "exact" means its exported weights are ``torch.equal``. Read-only and full destinations are real filesystem
conditions: a tmpfs mounted read-only (EROFS) or too small for a second checkpoint (ENOSPC), which stop
root as well (chmod would not).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from test_checkpoint import plant_bytes_entry, s3, torch_saved  # noqa: F401  (s3: a fixture, used by test 4)
from trainer_testkit import FEATURES, TrainerRun

from trainer.checkpoint import CheckpointManager
from trainer.distributed import DistContext
from trainer.model import mlp

if TYPE_CHECKING:
    from collections.abc import Iterator

    from test_checkpoint import S3Endpoint
    from torch import nn

    from trainer.model import ModelSpec

# Every test here is a 2-process torchrun run (tens of seconds each): the slow tier, skipped by make test-fast.
pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 10  # debug.yaml: batch 64 over 640 train rows
CTX = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
RECORD_DIR = "CTRAIN_TEST_RECORD_DIR"


# ---- helpers -----------------------------------------------------------------------------------
def recording_mlp(spec: ModelSpec, **kwargs: Any) -> nn.Module:
    """``mlp`` (same parameters, same init) that appends each training batch's input rows to
    ``$CTRAIN_TEST_RECORD_DIR/rank{R}-attempt{A}.jsonl``: the samples each rank really consumed."""
    model = mlp(spec, **kwargs)
    out = Path(os.environ[RECORD_DIR]) / (
        f"rank{os.environ.get('RANK', '0')}-attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}.jsonl"
    )

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if module.training:
            with out.open("a") as stream:
                stream.write(json.dumps(args[0].tolist()) + "\n")

    model.register_forward_pre_hook(record)
    return model


def noisy_mlp(spec: ModelSpec, **kwargs: Any) -> nn.Module:
    """``mlp`` whose training forward scales its input by noise from python's ``random`` and numpy's
    ``np.random``: a user model relying on the global RNGs the trainer seeds per rank."""
    model = mlp(spec, **kwargs)

    def jitter(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor] | None:
        if not module.training:
            return None
        (x,) = args
        noise = torch.from_numpy(np.random.normal(1.0, 0.05, size=tuple(x.shape))).to(x.dtype)
        return (x * noise * random.gauss(1.0, 0.05),)

    model.register_forward_pre_hook(jitter)
    return model


def committed_steps(directory: Path) -> list[int]:
    return sorted(
        int(p.name.removeprefix("step-")) for p in directory.glob("step-*") if (p / "manifest.json").exists()
    )


def latest(uri: str) -> int | None:
    """What a new run would resume from (``latest()`` does not look at config hash or dataset)."""
    model = torch.nn.Linear(1, 1)
    return CheckpointManager(
        uri, CTX, model=model, optimizer=torch.optim.SGD(model.parameters()), config_hash="-",
        dataset_version="-", async_save=False, allow_mismatch=True,
    ).latest()  # fmt: skip


def assert_same_weights(run: TrainerRun, reference: TrainerRun) -> None:
    ours, theirs = run.weights(), reference.weights()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def epoch_points(run: TrainerRun, key: str = "val_loss") -> list[int]:
    client = MlflowClient(run.tracking_uri)
    return sorted(m.step for m in client.get_metric_history(run.result()["mlflow_run_id"], key))


def rewrite_with_manifest(step_dir: Path, name: str, blob: bytes) -> None:
    """Replace ``name`` and make the manifest vouch for it (an attacker who can write both)."""
    (step_dir / name).write_bytes(blob)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(blob).hexdigest()
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


@contextmanager
def tmpfs(path: Path, size_bytes: int, *, read_only: bool = False) -> Iterator[None]:
    """Mount a tmpfs of ``size_bytes`` at ``path`` for the duration (root with CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes},mode=0755" + (",ro" if read_only else "")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "ctrain-test", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


class _Payload:
    """Unpickling this runs ``os.system`` - a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


# ---- 1 ------------------------------------------------------------------------------------------
def test_fault1_sigkill_mid_epoch_resumes_exactly_with_one_pass_per_epoch(
    finished: TrainerRun, trainer_run: TrainerRun
) -> None:
    records = trainer_run.tmp / "consumed"
    records.mkdir()
    proc = trainer_run(
        "model.factory=test_checkpoint_faults:recording_mlp",
        "model.kwargs={hidden_sizes: [16], dropout: 0.1}",  # debug.yaml's, so the reference's weights
        "checkpoint.every_steps=5",
        nproc=2,
        max_restarts=1,
        env={RECORD_DIR: str(records)},
        # Rank 1 dies before step 17, mid epoch 2; the last checkpoint is 15. step_delay_s: time for
        # the async step-15 save to commit before the kill.
        faults={"kill_at_step": 17, "kill_rank": 1, "step_delay_s": 0.05},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fault injection: SIGKILL at step 17" in proc.stderr
    assert "resumed from" in proc.stderr and "step-00000015" in proc.stderr
    assert_same_weights(trainer_run, finished)
    assert len(trainer_run.runs()) == 1
    assert epoch_points(trainer_run) == [1, 2, 3]  # no duplicated epoch points across the restart

    # Rows -> transaction ids; the first attempt's steps after the resume point were redone, so they
    # do not count. What is left must be, per epoch, every training sample exactly once.
    train = pd.read_parquet(Path(finished.dataset_uri.removeprefix("file://")) / "train.parquet")
    rows = torch.tensor(train[FEATURES].to_numpy(), dtype=torch.float32)
    ids = {tuple(r.tolist()): int(i) for r, i in zip(rows, train["transaction_id"], strict=True)}
    consumed: dict[int, list[int]] = {1: [], 2: [], 3: []}
    for rank in (0, 1):
        first = (records / f"rank{rank}-attempt0.jsonl").read_text().splitlines()
        second = (records / f"rank{rank}-attempt1.jsonl").read_text().splitlines()
        assert len(first) >= 16 and len(second) == 30 - 15  # killed at 17; resumed at 15
        for step, line in [*enumerate(first[:15], start=1), *enumerate(second, start=16)]:
            consumed[math.ceil(step / STEPS_PER_EPOCH)] += [ids[tuple(r)] for r in json.loads(line)]
    for epoch, seen in consumed.items():
        assert sorted(seen) == sorted(ids.values()), f"epoch {epoch} is not exactly one pass"


def test_fault1_a_model_drawing_from_python_and_numpy_rng_resumes_exactly(
    tmp_path: Path, snapshot_uri: str
) -> None:
    overrides = ("model.factory=test_checkpoint_faults:noisy_mlp", "checkpoint.every_steps=5")
    reference = TrainerRun(tmp_path / "reference", snapshot_uri)
    proc = reference(*overrides, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = TrainerRun(tmp_path / "resumed", snapshot_uri)
    proc = resumed(
        *overrides,
        nproc=2,
        max_restarts=1,
        faults={"kill_at_step": 17, "kill_rank": 1, "step_delay_s": 0.05},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step-00000015" in proc.stderr
    assert_same_weights(resumed, reference)


# ---- 2 ------------------------------------------------------------------------------------------
def test_fault2_kill_between_data_files_and_manifest_never_uses_that_step(
    finished: TrainerRun, trainer_run: TrainerRun
) -> None:
    proc = trainer_run(
        "distributed.timeout_s=10", nproc=2, max_restarts=1, faults={"kill_before_manifest": 20}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fault injection: SIGKILL before the manifest of step 20" in proc.stderr
    assert "step-00000020 skipped: no manifest (save did not complete)" in proc.stderr
    assert "resumed from" in proc.stderr and "step-00000010" in proc.stderr
    assert_same_weights(trainer_run, finished)
    (run,) = trainer_run.runs()
    events = run.data.tags["checkpoint_events"]
    assert "step-00000020 skipped: no manifest" in events
    assert "step-00000020 removed (newer than resume point)" in events
    # The orphan is gone; what is left is retention's choice, every directory committed.
    directory = trainer_run.checkpoint_dir()
    assert sorted(p.name for p in directory.iterdir()) == [
        f"step-{s:08d}" for s in committed_steps(directory)
    ]
    assert committed_steps(directory)[-1] == 30
    assert epoch_points(trainer_run) == [1, 2, 3]


# ---- 3 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_fault3_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    finished: TrainerRun, trainer_run: TrainerRun, damage: str
) -> None:
    # A first attempt dies before step 25 (no restart): steps 10 and 20 are committed.
    proc = trainer_run(nproc=2, faults={"kill_at_step": 25, "kill_rank": 1, "step_delay_s": 0.05})
    assert proc.returncode != 0
    directory = trainer_run.checkpoint_dir()
    assert committed_steps(directory) == [10, 20]
    victim = directory / "step-00000020" / "__1_0.distcp"
    blob = bytearray(victim.read_bytes())
    if damage == "flip a byte":
        blob[len(blob) // 2] ^= 0x01
    else:
        del blob[len(blob) // 2 :]
    victim.write_bytes(bytes(blob))

    proc = trainer_run(nproc=2)  # the rerun (an Airflow retry)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-00000020 skipped: __1_0.distcp does not match its sha256 (corrupt)" in proc.stderr
    assert "resumed from" in proc.stderr and "step-00000010" in proc.stderr
    assert_same_weights(trainer_run, finished)
    (run,) = trainer_run.runs()
    assert (
        "step-00000020 skipped: __1_0.distcp does not match its sha256" in run.data.tags["checkpoint_events"]
    )
    assert epoch_points(trainer_run) == [1, 2, 3]


# ---- 4 ------------------------------------------------------------------------------------------
def test_fault4_s3_endpoint_gone_during_save_is_retryable_and_a_rerun_resumes(
    finished: TrainerRun,
    trainer_run: TrainerRun,
    s3: S3Endpoint,  # noqa: F811
) -> None:
    import boto3

    prefix = f"runs/fault4-{uuid.uuid4().hex}"  # moto keeps every bucket's state for the whole session
    trainer_run.checkpoint_uri = f"s3://ckpt/{prefix}"
    client = boto3.client("s3", endpoint_url=s3.url)
    outcome: dict[str, subprocess.CompletedProcess[str]] = {}
    # A slow run (0.15 s per step), so the endpoint can be taken away after step 10 is committed and
    # before the step-20 save.
    worker = threading.Thread(
        target=lambda: outcome.update(proc=trainer_run(nproc=2, faults={"step_delay_s": 0.15}))
    )
    worker.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        listed = client.list_objects_v2(Bucket="ckpt", Prefix=f"{prefix}/step-00000010/manifest.json")
        if listed.get("KeyCount"):
            break
        time.sleep(0.05)
    else:
        pytest.fail("step 10 was never committed")
    s3.stop()
    worker.join(timeout=300)
    proc = outcome["proc"]
    assert proc.returncode != 0
    result = trainer_run.result()
    assert result["exit_code"] == 75 and result["retryable"] is True, result
    assert f"checkpoint storage {trainer_run.checkpoint_uri}" in result["error"]

    s3.start()  # back, with its state
    assert latest(trainer_run.checkpoint_uri) == 10  # never a partial checkpoint
    proc = trainer_run(nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {trainer_run.checkpoint_uri}/step-00000010" in proc.stderr
    assert_same_weights(trainer_run, finished)
    assert epoch_points(trainer_run) == [1, 2, 3]


# ---- 5 ------------------------------------------------------------------------------------------
def test_fault5_read_only_destination_stops_before_training(trainer_run: TrainerRun) -> None:
    directory = trainer_run.checkpoint_dir()
    with tmpfs(directory, 1 << 20, read_only=True):
        proc = trainer_run(nproc=2)
        left = sorted(os.listdir(directory))
    assert proc.returncode != 0
    result = trainer_run.result()
    assert result["status"] == "failed" and result["exit_code"] == 65 and result["retryable"] is False
    error = result["error"]
    assert f"checkpoint destination {trainer_run.checkpoint_uri} is not writable" in error
    assert "Read-only file system" in error and "set checkpoint.uri to a writable location" in error
    assert f"checkpoint destination {trainer_run.checkpoint_uri} is not writable" in proc.stderr
    assert left == []
    assert trainer_run.runs() == []  # it stopped before training: no MLflow run, no step taken


def test_fault5_full_destination_stops_with_a_clear_error_and_commits_nothing_partial(
    finished: TrainerRun, trainer_run: TrainerRun
) -> None:
    # Room for one checkpoint of this run and a few pages more: step 10 fits, step 20 cannot.
    one = sum(
        math.ceil(p.stat().st_size / 4096) for p in (finished.checkpoint_dir() / "step-00000030").iterdir()
    )
    directory = trainer_run.checkpoint_dir()
    with tmpfs(directory, (one + 4) * 4096):
        proc = trainer_run(nproc=2)
        left = sorted(p.name for p in directory.iterdir())
        committed = committed_steps(directory)
        resume_point = latest(trainer_run.checkpoint_uri)
    assert proc.returncode != 0
    result = trainer_run.result()
    assert result["status"] == "failed" and result["exit_code"] == 65 and result["retryable"] is False
    error = result["error"]
    assert f"checkpoint destination {trainer_run.checkpoint_uri}" in error
    assert "is full" in error and "No space left on device" in error
    assert "Free space there, or set checkpoint.uri" in error
    assert committed == [10] and resume_point == 10
    assert set(left) <= {"step-00000010", "step-00000020"}  # step 20, if present, has no manifest
    (run,) = trainer_run.runs()
    assert run.info.status == "FAILED" and "is full" in run.data.tags["last_failure"]
    # It stopped at the next checkpoint after the failed one instead of training on without them.
    assert epoch_points(trainer_run, "train_loss") == [1, 2]


# ---- 6 ------------------------------------------------------------------------------------------
def test_fault6_pickle_bearing_metadata_is_refused_and_the_run_starts_fresh(
    finished: TrainerRun, trainer_run: TrainerRun
) -> None:
    proc = trainer_run(nproc=2, faults={"kill_at_step": 15, "kill_rank": 1, "step_delay_s": 0.05})
    assert proc.returncode != 0
    directory = trainer_run.checkpoint_dir()
    assert committed_steps(directory) == [10]
    marker = trainer_run.tmp / "payload-ran"
    rewrite_with_manifest(directory / "step-00000010", ".metadata", pickle.dumps(_Payload(marker)))

    proc = trainer_run(nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-00000010 skipped: .metadata refused" in proc.stderr
    assert "posix.system, which is not allowed" in proc.stderr
    assert "resumed from" not in proc.stderr
    assert not marker.exists()
    assert_same_weights(trainer_run, finished)  # trained from scratch, same seed


def test_fault6_bytes_entry_in_metadata_is_refused_and_the_previous_checkpoint_is_used(
    finished: TrainerRun, trainer_run: TrainerRun
) -> None:
    # A first attempt dies before step 25 (no restart): steps 10 and 20 are committed.
    proc = trainer_run(nproc=2, faults={"kill_at_step": 25, "kill_rank": 1, "step_delay_s": 0.05})
    assert proc.returncode != 0
    directory = trainer_run.checkpoint_dir()
    assert committed_steps(directory) == [10, 20]
    marker = trainer_run.tmp / "payload-ran"
    # Rank 1's RNG entry becomes a pickled object: only allow-listed classes, a manifest that vouches.
    plant_bytes_entry(directory / "step-00000020", "rng.torch_rank1", torch_saved(_Payload(marker)))

    proc = trainer_run(nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-00000020 skipped: .metadata refused" in proc.stderr
    assert "rng.torch_rank1 is a bytes item" in proc.stderr
    assert "resumed from" in proc.stderr and "step-00000010" in proc.stderr
    assert not marker.exists()
    assert_same_weights(trainer_run, finished)


def test_fault6_pickle_bearing_tensor_file_is_refused_with_a_terminal_error(trainer_run: TrainerRun) -> None:
    proc = trainer_run(nproc=2, faults={"kill_at_step": 15, "kill_rank": 1, "step_delay_s": 0.05})
    assert proc.returncode != 0
    step_dir = trainer_run.checkpoint_dir() / "step-00000010"
    marker = trainer_run.tmp / "payload-ran"
    for name in ("__0_0.distcp", "__1_0.distcp"):
        rewrite_with_manifest(step_dir, name, pickle.dumps(_Payload(marker)))

    proc = trainer_run(nproc=2)
    assert proc.returncode != 0
    result = trainer_run.result()
    assert result["exit_code"] == 65 and result["retryable"] is False
    assert f"checkpoint {trainer_run.checkpoint_uri}/step-00000010 refused" in result["error"]
    assert not marker.exists()
