"""Benchmark (not a test): epoch time of ctrain's trainer vs a hand-written loop vs PyTorch Lightning.

    .venv/bin/python bench/loop_overhead.py            # full run, a few minutes on 2 cores
    .venv/bin/python bench/loop_overhead.py --quick    # smoke run on small data

All three train the same model (``trainer.model:mlp`` 30 -> 64 -> 32 -> 1, dropout 0.1) on the same
synthetic data with the same math: AdamW, per-step linear-warmup + cosine LR, gradient clipping at 1.0,
and a validation pass per epoch computing loss, ROC AUC, PR AUC and accuracy.

- raw: a plain PyTorch loop over index batches of in-memory tensors, nothing else.
- ours: ``python -m trainer train --config configs/default.yaml`` with everything on: validation, early
  stopping (patience above the epoch count, so it never fires), the scheduler, async MLflow logging
  (SQLite), system metrics, an async DCP checkpoint with manifest per epoch. Epoch time is the full
  cycle from one epoch's metrics to the next one's (their MLflow timestamps): training, validation,
  checkpoint, logging and anything else the loop does between epochs.
- lightning: ``lightning.Trainer`` with the same LightningModule math, validation, EarlyStopping and a
  ModelCheckpoint every epoch, no logger, fed whole index batches (no per-sample collation, so the
  comparison measures the framework rather than the DataLoader).

Every variant runs in a fresh process with 1 intra-op thread, and the variants alternate round by round,
so start-up state and load from other processes on the machine hit all of them alike. Next to the ratio
of medians the table shows the ratio of the fastest epochs, which load from other processes can only
make slower, never faster. The first epoch of every run is warm-up and dropped; the
reported number is the median of the remaining epoch times. DDP compares 2 processes x 1 thread against
1 process x 2 threads at the same global batch (512).

The table is printed first; the last line is one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_average_precision

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "training_image" / "configs" / "default.yaml"
NUM_FEATURES = 30
HIDDEN = (64, 32)
DROPOUT = 0.1
LR, WEIGHT_DECAY, WARMUP, MIN_LR_RATIO, CLIP = 0.003, 1e-4, 50, 0.05, 1.0
EVAL_BATCH = 8192
SEED = 0


# ---- data ------------------------------------------------------------------------------------------
def write_snapshot(root: Path, rows: int) -> str:
    """A snapshot in the contract format: train/val/test parquet + manifest.json, fraud-like rule."""
    rng = np.random.default_rng(SEED)
    weights = rng.normal(size=NUM_FEATURES)
    splits = {}
    sizes = {"train": rows, "val": rows // 10, "test": rows // 10}
    start = 0
    for name, n in sizes.items():
        x = rng.normal(size=(n, NUM_FEATURES)).astype(np.float32) * 3 + 1
        label = ((x @ weights) / 10 + rng.normal(size=n) > 2.0).astype(np.int64)
        frame = pd.DataFrame(x, columns=[f"f{i:02d}" for i in range(NUM_FEATURES)])
        frame.insert(0, "transaction_id", np.arange(start, start + n, dtype=np.int64))
        frame["label"] = label
        path = root / f"{name}.parquet"
        frame.to_parquet(path, index=False)
        splits[name] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "rows": n}
        start += n
    manifest = {
        "dataset_version": hashlib.sha256("".join(s["sha256"] for s in splits.values()).encode()).hexdigest()[
            :16
        ],
        "feature_service": "bench",
        "feature_columns": [f"f{i:02d}" for i in range(NUM_FEATURES)],
        "label_column": "label",
        "id_column": "transaction_id",
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return f"file://{root}"


def load_tensors(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name in ("train", "val"):
        frame = pd.read_parquet(root / f"{name}.parquet")
        x = torch.from_numpy(frame.filter(like="f").to_numpy(np.float32).copy())
        out[name] = (x, torch.from_numpy(frame["label"].to_numpy(np.float32)))
    return out


def build_model(train_x: torch.Tensor) -> torch.nn.Module:
    from trainer.model import ModelSpec, mlp

    spec = ModelSpec(
        num_features=NUM_FEATURES,
        num_outputs=1,
        feature_names=tuple(f"f{i:02d}" for i in range(NUM_FEATURES)),
        feature_mean=train_x.double().mean(0).float(),
        feature_std=train_x.double().std(0, unbiased=False).float(),
    )
    torch.manual_seed(SEED)
    return mlp(spec, hidden_sizes=HIDDEN, dropout=DROPOUT)


def warmup_cosine(total_steps: int):  # noqa: ANN201 - a LambdaLR factor
    def factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        progress = min(1.0, (step - WARMUP) / max(1, total_steps - WARMUP))
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def validate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + EVAL_BATCH]).squeeze(-1) for i in range(0, len(x), EVAL_BATCH)])
    model.train()
    probs, target = torch.sigmoid(logits), y.long()
    return {
        "val_loss": float(F.binary_cross_entropy_with_logits(logits, y)),
        "val_roc_auc": float(binary_auroc(probs, target)),
        "val_pr_auc": float(binary_average_precision(probs, target)),
        "val_accuracy": float(binary_accuracy(probs, target)),
    }


# ---- raw -------------------------------------------------------------------------------------------
def run_raw(data: dict[str, Any], batch: int, epochs: int) -> list[float]:
    x, y = data["train"]
    model = build_model(x)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    steps = math.ceil(len(x) / batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs * steps))
    generator = torch.Generator().manual_seed(SEED)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = F.binary_cross_entropy_with_logits(model(x[idx]).squeeze(-1), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            optimizer.step()
            scheduler.step()
        validate(model, *data["val"])
        times.append(time.perf_counter() - started)
    return times


# ---- lightning -------------------------------------------------------------------------------------
def run_lightning(data: dict[str, Any], batch: int, epochs: int, workdir: Path) -> list[float]:
    import lightning as L
    from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

    class Batched(Dataset):
        def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
            self.x, self.y = x, y

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            return self.x[idx], self.y[idx]

    x, y = data["train"]
    steps = math.ceil(len(x) / batch)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model(x)

        def training_step(self, batch_xy: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            bx, by = batch_xy
            return F.binary_cross_entropy_with_logits(self.model(bx).squeeze(-1), by)

        def on_validation_epoch_start(self) -> None:
            self.val_logits: list[torch.Tensor] = []

        def validation_step(self, batch_xy: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
            self.val_logits.append(self.model(batch_xy[0]).squeeze(-1))

        def on_validation_epoch_end(self) -> None:
            logits = torch.cat(self.val_logits)
            vy = data["val"][1]
            probs = torch.sigmoid(logits)
            self.log("val_loss", F.binary_cross_entropy_with_logits(logits, vy))
            self.log("val_roc_auc", binary_auroc(probs, vy.long()))
            self.log("val_pr_auc", binary_average_precision(probs, vy.long()))
            self.log("val_accuracy", binary_accuracy(probs, vy.long()))

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs * steps))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.end = 0.0

        def on_train_epoch_start(self, *_: Any) -> None:
            self.starts.append(time.perf_counter())

        def on_fit_end(self, *_: Any) -> None:
            self.end = time.perf_counter()

    generator = torch.Generator().manual_seed(SEED)
    train_loader = DataLoader(
        Batched(x, y),
        sampler=BatchSampler(RandomSampler(range(len(x)), generator=generator), batch, drop_last=False),
        batch_size=None,
    )
    vx, vy = data["val"]
    val_loader = DataLoader(
        Batched(vx, vy), sampler=BatchSampler(range(len(vx)), EVAL_BATCH, drop_last=False), batch_size=None
    )
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=CLIP,
        default_root_dir=str(workdir),
        callbacks=[
            timer,
            L.pytorch.callbacks.EarlyStopping(monitor="val_loss", patience=epochs + 1),
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=str(workdir / "lightning_ckpt"), save_last=True, save_top_k=0
            ),
        ],
    )
    trainer.fit(Module(), train_loader, val_loader)
    marks = [*timer.starts, timer.end]
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


# ---- ours ------------------------------------------------------------------------------------------
def run_ours(
    snapshot_uri: str, batch: int, epochs: int, workdir: Path, nproc: int = 1, threads: int = 1
) -> list[float]:
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    overrides = {
        "data.dataset_uri": snapshot_uri,
        "checkpoint.uri": f"file://{run_dir / 'checkpoints'}",
        "output.uri": f"file://{run_dir / 'output'}",
        "train.epochs": epochs,
        "train.batch_size": batch,
        "early_stopping.patience": epochs + 1,
        "tracking.experiment": "bench",
    }
    args = ["-m", "trainer", "train", "--config", str(CONFIG)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir / 'mlflow.db'}",
    }
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=run_dir)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    from mlflow import MlflowClient

    run_id = json.loads((run_dir / "output" / "result.json").read_text())["mlflow_run_id"]
    history = sorted(
        MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, "epoch_time_s"), key=lambda m: m.step
    )
    # Epoch 1 (warm-up, dropped) by its own clock; then the whole cycle between two epochs' metrics,
    # so nothing the loop does outside its epoch timer escapes the measurement.
    cycles = [(b.timestamp - a.timestamp) / 1000 for a, b in zip(history, history[1:], strict=False)]
    return [history[0].value, *cycles]


# ---- one variant per fresh process -------------------------------------------------------------------
def run_isolated(variant: str, snapshot_dir: Path, batch: int, epochs: int, workdir: Path) -> list[float]:
    """Run raw or lightning in a fresh single-threaded process, as ours runs, so all start alike."""
    cmd = [sys.executable, __file__, "--variant", variant, "--snapshot", str(snapshot_dir)]
    cmd += ["--batch", str(batch), "--epochs", str(epochs), "--workdir", str(workdir)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def variant_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    data = load_tensors(Path(args.snapshot))
    if args.variant == "raw":
        times = run_raw(data, args.batch, args.epochs)
    else:
        times = run_lightning(data, args.batch, args.epochs, Path(tempfile.mkdtemp(dir=args.workdir)))
    print(json.dumps(times))


# ---- main ------------------------------------------------------------------------------------------
def steady(times: list[float]) -> list[float]:
    return times[1:] if len(times) > 1 else times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=500_000, help="train rows (val/test: a tenth each)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per batch size")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--variant", choices=["raw", "lightning"], help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        variant_main(args)
        return
    if args.quick:
        args.rows, args.epochs, args.rounds = 100_000, 2, 1
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="ctrain-bench-"))
    snapshot_dir = workdir / "snapshot"
    snapshot_dir.mkdir()
    snapshot_uri = write_snapshot(snapshot_dir, args.rows)

    medians: dict[str, dict[int, float]] = {"raw": {}, "ours": {}, "lightning": {}}
    minimums: dict[str, dict[int, float]] = {"raw": {}, "ours": {}, "lightning": {}}
    all_samples: dict[str, dict[int, list[float]]] = {"raw": {}, "ours": {}, "lightning": {}}
    for batch in (512, 64):
        samples: dict[str, list[float]] = {name: [] for name in medians}
        for _ in range(args.rounds):
            samples["raw"] += steady(run_isolated("raw", snapshot_dir, batch, args.epochs, workdir))
            samples["ours"] += steady(run_ours(snapshot_uri, batch, args.epochs, workdir))
            samples["lightning"] += steady(
                run_isolated("lightning", snapshot_dir, batch, args.epochs, workdir)
            )
        for name, values in samples.items():
            medians[name][batch] = statistics.median(values)
            minimums[name][batch] = min(values)
            all_samples[name][batch] = [round(v, 4) for v in values]

    ddp1 = statistics.median(steady(run_ours(snapshot_uri, 512, args.epochs, workdir, nproc=1, threads=2)))
    ddp2 = statistics.median(steady(run_ours(snapshot_uri, 512, args.epochs, workdir, nproc=2, threads=1)))

    print(
        f"rows={args.rows} features={NUM_FEATURES} epochs={args.epochs} rounds={args.rounds} torch={torch.__version__}"
    )
    print(
        f"{'loop':<11}{'bs512 s/epoch':>15}{'/raw':>8}{'(min)':>8}{'bs64 s/epoch':>15}{'/raw':>8}{'(min)':>8}"
    )
    for name in ("raw", "ours", "lightning"):
        cells = ""
        for batch in (512, 64):
            median, best = medians[name][batch], minimums[name][batch]
            cells += (
                f"{median:>15.3f}{median / medians['raw'][batch]:>8.3f}{best / minimums['raw'][batch]:>8.3f}"
            )
        print(f"{name:<11}{cells}")
    print(
        "(median epoch time; /raw = ratio of medians; (min) = ratio of the fastest epochs, less sensitive to load)"
    )
    print(
        f"DDP, global batch 512: 1 process x 2 threads {args.rows / ddp1:,.0f} samples/s, "
        f"2 processes x 1 thread {args.rows / ddp2:,.0f} samples/s, ratio {ddp1 / ddp2:.3f}"
    )
    result = {
        "ours_over_raw_bs512": round(medians["ours"][512] / medians["raw"][512], 4),
        "ours_over_raw_bs64": round(medians["ours"][64] / medians["raw"][64], 4),
        "lightning_over_raw_bs512": round(medians["lightning"][512] / medians["raw"][512], 4),
        "lightning_over_raw_bs64": round(medians["lightning"][64] / medians["raw"][64], 4),
        "ddp2_over_ddp1_throughput": round(ddp1 / ddp2, 4),
        "ours_over_raw_bs512_min": round(minimums["ours"][512] / minimums["raw"][512], 4),
        "ours_over_raw_bs64_min": round(minimums["ours"][64] / minimums["raw"][64], 4),
        "epoch_s": {name: {str(b): round(v, 4) for b, v in m.items()} for name, m in medians.items()},
        "epoch_samples_s": {name: {str(b): v for b, v in m.items()} for name, m in all_samples.items()},
        "rows": args.rows,
        "epochs": args.epochs,
        "rounds": args.rounds,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
