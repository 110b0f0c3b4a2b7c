"""The training loop: resume, then per epoch train + validate + checkpoint, then test and export.

Read :meth:`Trainer.fit` top to bottom; every side effect (logging, checkpointing, stopping) is an
explicit call there or in the step/eval methods right below it. Decisions that end the run are the
same on every rank: early stopping uses all-reduced metrics, the non-finite check uses the gradient
norm computed after DDP's all-reduce, and the wall-clock guardrail is agreed by a collective.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric

from trainer import distributed
from trainer.checkpoint import CheckpointManager
from trainer.data import ResumableSampler, Snapshot, Split, feature_stats, load_snapshot, shard
from trainer.errors import ConfigError, DivergenceError
from trainer.model import ModelSpec, build_model, factory_package
from trainer.progress import Progress
from trainer.tasks import Task
from trainer.tracking import Tracker

if TYPE_CHECKING:
    from trainer.config import SchedulerConfig, TrainerConfig
    from trainer.distributed import DistContext
    from trainer.lease import Lease

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 8192
EXPORT_CHECK_ROWS = 8  # train rows the export check traces the serving model on


@dataclass
class Monitor:
    """Tracks the best value of a metric and how many evaluations passed without improving it."""

    mode: str = "min"
    min_delta: float = 0.0
    best: float | None = None
    bad_evals: int = 0

    def update(self, value: float) -> bool:
        """Record ``value``; True if it improves on the best by more than ``min_delta``."""
        improved = (
            self.best is None
            or (self.mode == "min" and value < self.best - self.min_delta)
            or (self.mode == "max" and value > self.best + self.min_delta)
        )
        if improved:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return improved


@dataclass
class Interval:
    """Per-step numbers summed over the optimizer steps since the last ``step/*`` log point.

    In the running loop ``loss_sum`` and ``samples`` are this rank's; in a checkpoint
    (``LoopState.interval``) they are summed over ranks, and the rest is rank 0's (the gradient norm is
    the same on every rank; times are rank 0's), so a resume continues the interval it was saved in.
    """

    loss_sum: float = 0.0
    samples: int = 0
    steps: int = 0
    grad_norm_sum: float = 0.0
    step_time: float = 0.0
    data_wait: float = 0.0

    def add(
        self, loss_sum: float, samples: int, grad_norm: float, step_time: float, data_wait: float
    ) -> None:
        self.loss_sum += loss_sum
        self.samples += samples
        self.steps += 1
        self.grad_norm_sum += grad_norm
        self.step_time += step_time
        self.data_wait += data_wait


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly where a checkpoint left it (JSON-able)."""

    epoch: int = 0  # index of the epoch in progress (epochs are reported 1-based)
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    global_step: int = 0
    best_epoch: int | None = None
    best_step: int | None = None  # checkpoint step holding the best weights
    best_metrics: dict[str, float] = field(default_factory=dict)
    early_stop: Monitor = field(default_factory=Monitor)
    loss_plateau: Monitor = field(default_factory=Monitor)
    plateau_warned: bool = False
    epoch_loss_sum: float = 0.0  # global train-loss sum/count of the epoch so far (at the last checkpoint)
    epoch_loss_count: int = 0
    interval: Interval = field(default_factory=Interval)  # the step/* interval at the last checkpoint
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    stopped_reason: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopState:
        data = dict(data)
        data["early_stop"] = Monitor(**data["early_stop"])
        data["loss_plateau"] = Monitor(**data["loss_plateau"])
        data["interval"] = Interval(**data.get("interval", {}))
        return cls(**data)

    def state_dict(self) -> dict[str, Any]:
        """This state as JSON-able data (what the checkpoint's ``trainer_state.json`` holds under ``loop``)."""
        return asdict(self)

    def load_state_dict(self, data: dict[str, Any]) -> None:
        """Become the state ``data`` describes (in place: the checkpoint manager holds this object)."""
        restored = LoopState.from_json(data)
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(restored, name))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before the first call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


class Trainer:
    """Builds the run from the config and trains it; :meth:`fit` returns the ``result.json`` dict."""

    def __init__(self, cfg: TrainerConfig, ctx: DistContext, lease: Lease) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.lease = lease  # this job's hold on cfg.checkpoint.uri, taken by the caller
        self.config_hash = cfg.config_hash()
        self.started = time.monotonic()
        seed_everything(cfg.seed, cfg.train.deterministic)
        self.snapshot: Snapshot = load_snapshot(
            cfg.data.dataset_uri, cfg.task.type, cfg.data.verify_checksums
        )
        self.task = Task(cfg.task.type, cfg.task.num_classes)
        mean, std = feature_stats(self.snapshot.train)
        spec = ModelSpec(
            num_features=len(self.snapshot.feature_columns),
            num_outputs=cfg.task.num_outputs,
            feature_names=tuple(self.snapshot.feature_columns),
            feature_mean=mean,
            feature_std=std,
        )
        # Same seed on every rank for identical initial weights; then one stream per rank (dropout,
        # and python/numpy for user code).
        self.model = build_model(cfg.model.factory, spec, cfg.model.kwargs).to(ctx.device)
        self._check_exportable()
        self.model_package = factory_package(cfg.model.factory)
        seed_everything(cfg.seed + 1 + ctx.rank, cfg.train.deterministic)
        self.ddp = distributed.wrap_model(self.model, ctx, cfg.distributed)
        self.optimizer = _build_optimizer(cfg, self.model)
        self.sampler = ResumableSampler(
            num_samples=len(self.snapshot.train),
            batch_size=cfg.train.batch_size,
            accum=cfg.train.grad_accum_steps,
            world_size=ctx.world_size,
            rank=ctx.rank,
            seed=cfg.seed,
        )
        self.total_steps = cfg.train.epochs * self.sampler.steps_per_epoch
        self.scheduler = _build_scheduler(
            cfg.scheduler, self.optimizer, self.total_steps, cfg.early_stopping.mode
        )
        # Schedulers stepped per optimizer step (the others step per epoch or per evaluation).
        self.step_scheduler = self.scheduler if cfg.scheduler.name == "warmup_cosine" else None
        self.params = list(self.model.parameters())
        self.on_accelerator = ctx.device.type != "cpu"
        self.tracker = Tracker(cfg.tracking, enabled=ctx.is_main)
        self.state = LoopState(
            early_stop=Monitor(mode=cfg.early_stopping.mode, min_delta=cfg.early_stopping.min_delta),
            loss_plateau=Monitor(mode="min"),
        )
        # What a checkpoint holds, registered once: the sampler's position is the loop state's
        # (epoch, step_in_epoch), and the manager adds every rank's RNG streams itself.
        states: dict[str, Any] = {"loop": self.state}
        if self.scheduler is not None:
            states["scheduler"] = self.scheduler
        self.checkpoints = CheckpointManager(
            cfg.checkpoint.uri,
            ctx,
            model=self.model,
            optimizer=self.optimizer,
            states=states,
            config_hash=self.config_hash,
            dataset_version=self.snapshot.dataset_version,
            keep_last=cfg.checkpoint.keep_last,
            keep_best=cfg.checkpoint.keep_best,
            async_save=cfg.checkpoint.async_save,
            allow_mismatch=cfg.checkpoint.allow_mismatch,
            resume=cfg.checkpoint.resume,
        )
        self._checkpointed_step: int | None = None  # the global step of the last save (or resume)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if ctx.device.type == "cuda" and cfg.train.bf16_autocast
            else nullcontext()
        )
        self.progress = Progress(enabled=ctx.is_main, interactive=sys.stderr.isatty())
        self.interval = Interval()
        self._resumed_from: int | None = None

    def _check_exportable(self) -> None:
        """Rank 0 exports the serving model on a few train rows, before any step or checkpoint; every
        rank raises the same ConfigError if that fails (a model that cannot be served is a bad config)."""
        from trainer.export import check_exportable

        def check() -> str | None:
            sample = self.snapshot.train.features[:EXPORT_CHECK_ROWS].to(self.ctx.device)
            try:
                check_exportable(self.model, self.task, sample, self.cfg.model.factory)
            except ConfigError as exc:
                return str(exc)
            return None

        failure = distributed.from_main(self.ctx, "export_check", check)
        if failure is not None:
            raise ConfigError(failure)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Resume, train until done or stopped, then evaluate the best weights on test and export."""
        self._resume()
        self._start_tracking()
        while self.state.stopped_reason is None:
            if self.state.epoch >= self.cfg.train.epochs:
                self.state.stopped_reason = "completed"
                break
            self._train_epoch()
        self.checkpoints.wait()
        return self._finish()

    def _resume(self) -> None:
        # Restores model, optimizer, scheduler, loop state and RNG from the latest valid checkpoint, and
        # removes anything newer (an orphan or corrupt, and it would be rewritten anyway).
        step = self.checkpoints.load()
        if step is not None:
            if self.ctx.is_main:  # the other ranks' share of the interval's loss is in rank 0's sums
                self.interval = replace(self.state.interval)
            self._resumed_from = self._checkpointed_step = step
            state = self.state
            where = (
                f"after epoch {state.epoch}, step {step}"
                if state.step_in_epoch == 0
                else f"epoch {state.epoch + 1}, step {step}: "
                f"{state.step_in_epoch} of its {self.sampler.steps_per_epoch} steps done"
            )
            log.info("resumed from %s (%s)", self.checkpoints.step_uri(step), where)

    def _start_tracking(self) -> None:
        self.state.mlflow_run_id = self.tracker.start(self.state.mlflow_run_id or self.lease.run_id)
        self.lease.record_run(self.state.mlflow_run_id)  # before the first step: a restart continues it
        snap = self.snapshot
        self.tracker.log_params(
            {**self.cfg.flat(), "config_hash": self.config_hash, "world_size": self.ctx.world_size}
        )
        tags = {
            "dataset_version": snap.dataset_version,
            "feature_service": snap.manifest.get("feature_service", ""),
            "config_hash": self.config_hash,
            "checkpoint_uri": self.cfg.checkpoint.uri,
        }
        if self.model_package is not None:
            tags["model_package"] = self.model_package["name"]
            tags["model_package_version"] = self.model_package["version"]
        if self._resumed_from is not None:
            tags["resumed_from"] = self.checkpoints.step_uri(self._resumed_from)
        if self.checkpoints.events:
            tags["checkpoint_events"] = " | ".join(self.checkpoints.events)
        self.tracker.set_tags(tags)
        if self._resumed_from is None:
            # The whole resolved tree (params are flattened and capped at 6000 characters each).
            self.tracker.log_dict(self.cfg.model_dump(mode="json"), "config/resolved.yaml")
            label = snap.manifest["label_column"]
            columns = {c: "float" for c in snap.feature_columns}
            columns[label] = "double" if self.task.type == "regression" else "long"
            rows = {f"rows.{name}": str(len(getattr(snap, name))) for name in ("train", "val", "test")}
            self.tracker.log_dataset(
                source=snap.uri,
                name=f"{snap.manifest.get('feature_service', 'dataset')}@{snap.dataset_version[:12]}",
                digest=snap.dataset_version,
                columns=columns,
                tags={**rows, "feature_service": str(snap.manifest.get("feature_service", ""))},
            )

    # ------------------------------------------------------------------------------------------
    def _train_epoch(self) -> None:
        cfg, state = self.cfg.train, self.state
        epoch_started = time.monotonic()
        self.ddp.train()
        epoch_loss = _LocalLoss()
        stop: str | None = None
        self.progress.start_epoch(
            state.epoch + 1, cfg.epochs, self.sampler.steps_per_epoch, state.step_in_epoch
        )
        for step in self.sampler.steps(state.epoch, state.step_in_epoch):
            epoch_loss.add(*self._optimizer_step(step.micro_batches, step.global_size))
            state.global_step += 1
            state.step_in_epoch += 1
            log_due = state.global_step % cfg.log_every_steps == 0
            if log_due:
                self._log_interval()
            stop = self._guardrail(check_clock=log_due)
            if state.step_in_epoch == self.sampler.steps_per_epoch:
                break  # the epoch-end evaluation below handles `stop` too
            if stop or (cfg.eval_every_steps and state.global_step % cfg.eval_every_steps == 0):
                self._evaluate_and_checkpoint(epoch_loss, end_of_epoch=False, stop=stop)
            elif self.cfg.checkpoint.every_steps and state.global_step % self.cfg.checkpoint.every_steps == 0:
                self._fold_epoch_loss(epoch_loss)
                self._save()
            if state.stopped_reason:
                return
        self._evaluate_and_checkpoint(epoch_loss, end_of_epoch=True, stop=stop, started=epoch_started)

    def _optimizer_step(self, micro_batches: list[torch.Tensor], global_size: int) -> tuple[float, int]:
        """Forward/backward over the micro-batches, agree on finiteness, clip, step.

        Returns this rank's loss sum and sample count."""
        t0 = time.perf_counter()
        train, device = self.snapshot.train, self.ctx.device
        loss_sum, samples, data_wait = 0.0, 0, 0.0
        last = len(micro_batches) - 1
        for i, idx in enumerate(micro_batches):
            td = time.perf_counter()
            x, y = train.features[idx], train.labels[idx]
            if self.on_accelerator:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            data_wait += time.perf_counter() - td
            n = len(idx)
            # Only the last micro-batch all-reduces; the others accumulate gradients locally.
            sync = self.ddp.no_sync() if i < last and self.ctx.is_distributed else nullcontext()  # type: ignore[operator]
            with sync:
                with self.autocast, distributed.explained_ddp_errors(self.model, self.cfg.model.factory):
                    output = self.ddp(x).float()
                # The micro-batch mean, weighted by its share of the global batch times world_size
                # (DDP's gradient average divides that back out): the gradient is the mean over the
                # global batch whatever the rank/accumulation layout. An empty share (short last
                # batch) contributes a zero loss but still joins DDP's all-reduce via backward.
                loss = self.task.loss(output, y, "mean" if n else "sum")
                weight = n * self.ctx.world_size / global_size
                (loss if weight == 1.0 else loss * weight).backward()
            loss_sum += loss.item() * n
            samples += n
        # The gradients are all-reduced by now and identical on every rank, so this norm (and the
        # decision below) is too: no extra collective is needed to agree before optimizer.step().
        if self.cfg.train.grad_clip_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip_norm).item()
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None]
            ).item()
        if not math.isfinite(grad_norm):
            raise DivergenceError(
                f"non-finite gradient norm ({grad_norm}) at optimizer step {self.state.global_step + 1} "
                f"(epoch {self.state.epoch + 1}); the run stops without checkpointing this state. "
                "Lower optimizer.lr, enable train.grad_clip_norm, or check the data for extreme values."
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.step_scheduler is not None:
            self.step_scheduler.step()
        self.interval.add(loss_sum, samples, grad_norm, time.perf_counter() - t0, data_wait)
        self.progress.advance(loss_sum / max(samples, 1))
        return loss_sum, samples

    def _guardrail(self, check_clock: bool) -> str | None:
        """Stop reason if max_steps or max_wall_clock_s is reached (the clock check is agreed by all ranks)."""
        cfg = self.cfg.train
        if cfg.max_steps is not None and self.state.global_step >= cfg.max_steps:
            return "max_steps"
        if cfg.max_wall_clock_s is not None and check_clock:
            over = time.monotonic() - self.started >= cfg.max_wall_clock_s
            if distributed.any_rank(over, self.ctx.device):
                return "max_wall_clock"
        return None

    def _log_interval(self) -> None:
        interval, self.interval = self.interval, Interval()
        totals = distributed.all_reduce_sum(
            torch.tensor([interval.loss_sum, interval.samples], dtype=torch.float64)
        )
        if self.ctx.is_main and interval.steps:
            seconds = interval.step_time
            metrics = {
                "loss": float(totals[0] / max(totals[1], 1)),
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": interval.grad_norm_sum / interval.steps,
                "samples_per_s": float(totals[1]) / seconds if seconds > 0 else 0.0,
                "step_time_ms": 1000 * seconds / interval.steps,
                "data_wait_ms": 1000 * interval.data_wait / interval.steps,
            }
            # Keyed under step/ so they never mix with the per-epoch series (step = epoch).
            step_metrics = {f"step/{k}": v for k, v in metrics.items()}
            self.tracker.log_metrics(step_metrics, step=self.state.global_step, buffered=True)
            self.progress.log_line(self.state.epoch + 1, self.state.global_step, metrics)

    # ------------------------------------------------------------------------------------------
    def _evaluate_and_checkpoint(
        self, epoch_loss: _LocalLoss, *, end_of_epoch: bool, stop: str | None, started: float | None = None
    ) -> None:
        """Validate, update best/early-stopping/plateau state, checkpoint, log, decide to stop."""
        state, es = self.state, self.cfg.early_stopping
        metrics = self.evaluate(self.snapshot.val, "val")
        self._fold_epoch_loss(epoch_loss)
        epoch_number = state.epoch + 1
        if end_of_epoch:
            metrics["train_loss"] = state.epoch_loss_sum / max(state.epoch_loss_count, 1)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if state.early_stop.update(metrics[es.monitor]):
            state.best_epoch, state.best_step = epoch_number, state.global_step
            state.best_metrics = {k: v for k, v in metrics.items() if k.startswith("val_")}
        self._check_loss_plateau(metrics["val_loss"])
        if self.scheduler is not None and self.cfg.scheduler.name == "plateau":
            self.scheduler.step(metrics[es.monitor])
        elif self.scheduler is not None and self.cfg.scheduler.name == "step" and end_of_epoch:
            self.scheduler.step()
        state.history.append({"epoch": epoch_number, "step": state.global_step, **metrics})
        if end_of_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
        if es.enabled and state.early_stop.bad_evals >= es.patience:
            stop = stop or "early_stopping"
        state.stopped_reason = stop
        self._save()  # every evaluation is checkpointed, so best_step always names a checkpoint
        if end_of_epoch:
            if started is not None:
                metrics["epoch_time_s"] = time.monotonic() - started
            self.tracker.log_metrics(metrics, step=epoch_number, buffered=True)
        else:
            eval_metrics = {f"eval/{k}": v for k, v in metrics.items()}
            self.tracker.log_metrics(eval_metrics, step=state.global_step, buffered=True)
        self.tracker.flush()  # metrics up to a checkpoint are sent with it, so a resume never misses them
        self.progress.log_eval(epoch_number, metrics, stop)

    def _fold_epoch_loss(self, epoch_loss: _LocalLoss) -> None:
        """Add every rank's train loss since the last fold into the (checkpointed) epoch totals."""
        totals = distributed.all_reduce_sum(
            torch.tensor([epoch_loss.sum, epoch_loss.count], dtype=torch.float64)
        )
        self.state.epoch_loss_sum += float(totals[0])
        self.state.epoch_loss_count += int(totals[1])
        epoch_loss.sum, epoch_loss.count = 0.0, 0

    def _save(self) -> None:
        if self._checkpointed_step == self.state.global_step:
            return
        self.lease.check()  # a trainer that lost the directory to another writes nothing more there
        totals = distributed.all_reduce_sum(
            torch.tensor([self.interval.loss_sum, self.interval.samples], dtype=torch.float64)
        )
        self.state.interval = replace(self.interval, loss_sum=float(totals[0]), samples=int(totals[1]))
        self.checkpoints.save(self.state.global_step, best_step=self.state.best_step)
        self._checkpointed_step = self.state.global_step
        self.tracker.flush()

    def _check_loss_plateau(self, val_loss: float) -> None:
        state, k = self.state, self.cfg.train.plateau_warning_evals
        state.loss_plateau.update(val_loss)
        if state.loss_plateau.bad_evals >= k and not state.plateau_warned:
            message = f"val_loss has not improved for {k} evaluations (best {state.loss_plateau.best:.6g})"
            log.warning(message)
            self.tracker.set_tags({"plateau_warning": message})
            state.plateau_warned = True

    @torch.no_grad()
    def evaluate(self, split: Split, prefix: str) -> dict[str, float]:
        """Loss and task metrics over ``split``, each rank scoring its shard; synced across ranks."""
        self.model.eval()
        metrics = self.task.metrics().to(self.ctx.device)
        mean_loss = MeanMetric().to(self.ctx.device)
        for idx in shard(len(split), self.ctx.world_size, self.ctx.rank, EVAL_BATCH_SIZE):
            x = split.features[idx].to(self.ctx.device)
            y = split.labels[idx].to(self.ctx.device)
            with self.autocast:
                out = self.model(x).float()
            mean_loss.update(self.task.loss(out, y, "none"))
            metrics.update(self.task.predict(out), self.task.metric_target(y))
        self.model.train()
        values = {f"{prefix}_{k}": float(v) for k, v in metrics.compute().items()}
        values[f"{prefix}_loss"] = float(mean_loss.compute())
        return values

    # ------------------------------------------------------------------------------------------
    def _finish(self) -> dict[str, Any]:
        """Load the best checkpoint, score the test split, export the model, build result.json."""
        from trainer.export import log_model
        from trainer.plots import curve_figure

        state = self.state
        if state.best_step is None:
            raise DivergenceError("training ended before any validation; no model to export")
        self.checkpoints.load_model(state.best_step)
        test = self.evaluate(self.snapshot.test, "test")
        model_uri = None
        if self.ctx.is_main:
            self.tracker.log_metrics(test, step=state.best_epoch or 0)
            model_uri = log_model(
                self.model, self.task, self.snapshot.feature_columns, self.snapshot.test.features[:5].numpy()
            )
            if self.cfg.tracking.loss_curve and state.history:
                self.tracker.log_figure(curve_figure(state.history), "plots/loss_curve.png")
        self.checkpoints.close()
        return {
            "status": "succeeded",
            "mlflow_run_id": state.mlflow_run_id,
            "model_uri": model_uri,
            "metrics": {**test, **{f"best_{k}": v for k, v in state.best_metrics.items()}},
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "global_step": state.global_step,
            "checkpoint": self.checkpoints.step_uri(state.best_step),
            "dataset_version": self.snapshot.dataset_version,
            "config_hash": self.config_hash,
            "seed": self.cfg.seed,
            "world_size": self.ctx.world_size,
            "stopped_reason": state.stopped_reason,
            "model_package": self.model_package,
        }


@dataclass
class _LocalLoss:
    """This rank's train-loss sum and sample count since the last fold into the loop state."""

    sum: float = 0.0
    count: int = 0

    def add(self, loss_sum: float, samples: int) -> None:
        self.sum += loss_sum
        self.count += samples


def _build_optimizer(cfg: TrainerConfig, model: nn.Module) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)


def _build_scheduler(
    cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, total_steps: int, mode: str
) -> Any:
    if cfg.name == "warmup_cosine":
        warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.gamma, patience=cfg.plateau_patience
        )
    return None
