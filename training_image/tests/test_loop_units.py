"""Loop building blocks in isolation: early-stopping monitor, checkpointed loop state, LR schedules,
progress output."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch

from trainer.config import SchedulerConfig
from trainer.loop import Interval, LoopState, Monitor, _build_scheduler
from trainer.progress import Progress


def stop_epoch(curve: list[float], patience: int, mode: str = "min", min_delta: float = 0.0) -> int | None:
    """1-based epoch at which early stopping fires on ``curve`` (None if it never does)."""
    monitor = Monitor(mode=mode, min_delta=min_delta)
    for epoch, value in enumerate(curve, start=1):
        monitor.update(value)
        if monitor.bad_evals >= patience:
            return epoch
    return None


@pytest.mark.parametrize(
    ("curve", "patience", "mode", "min_delta", "expected"),
    [
        ([1.0, 0.9, 0.95, 0.91, 0.92, 0.5], 3, "min", 0.0, 5),  # best at 2, three misses -> 5
        ([1.0, 0.9, 0.95, 0.85, 0.86, 0.87], 2, "min", 0.0, 6),  # the improvement at 4 resets the count
        ([1.0, 0.99, 0.985, 0.98], 2, "min", 0.015, 3),  # improvements below min_delta do not count
        ([0.80, 0.85, 0.84, 0.86, 0.83, 0.82], 2, "max", 0.0, 6),  # max mode: best 0.86 at 4
        ([0.5, 0.4, 0.3, 0.2], 1, "min", 0.0, None),  # always improving: never stops
    ],
)
def test_early_stopping_fires_at_the_expected_epoch(
    curve: list[float], patience: int, mode: str, min_delta: float, expected: int | None
) -> None:
    assert stop_epoch(curve, patience, mode, min_delta) == expected


def test_loop_state_survives_its_json_round_trip() -> None:
    state = LoopState(epoch=2, step_in_epoch=7, global_step=27, best_epoch=2, best_step=20)
    state.early_stop.update(0.5)
    state.early_stop.update(0.6)
    state.history.append({"epoch": 1, "step": 10, "val_loss": 0.5})
    state.interval = Interval(loss_sum=12.5, samples=128, steps=2, grad_norm_sum=0.9, step_time=0.02)
    restored = LoopState.from_json(json.loads(json.dumps(asdict(state))))
    assert restored == state
    assert restored.early_stop.bad_evals == 1 and restored.early_stop.best == 0.5
    assert restored.interval.steps == 2 and restored.interval.samples == 128
    # A checkpoint from before the interval was saved resumes with an empty one.
    older = {k: v for k, v in asdict(state).items() if k != "interval"}
    assert LoopState.from_json(older).interval == Interval()


def test_warmup_cosine_schedule_shape() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = SchedulerConfig(name="warmup_cosine", warmup_steps=4, min_lr_ratio=0.1)
    scheduler = _build_scheduler(cfg, optimizer, total_steps=104, mode="min")
    lrs = []
    for _ in range(104):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[54] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_step_and_plateau_schedules_decay() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    step = _build_scheduler(SchedulerConfig(name="step", step_size=2, gamma=0.5), optimizer, 10, "min")
    for _ in range(4):
        optimizer.step()
        step.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    plateau = _build_scheduler(
        SchedulerConfig(name="plateau", gamma=0.1, plateau_patience=0), optimizer, 10, "max"
    )
    for value in (0.8, 0.7):
        plateau.step(value)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert _build_scheduler(SchedulerConfig(name="constant"), optimizer, 10, "min") is None


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = {"loss": 0.25, "lr": 1e-3, "grad_norm": 0.5, "samples_per_s": 1234.0}
    bar = Progress(enabled=True, interactive=True)
    bar.start_epoch(2, 5, steps=10, done=4)
    bar.advance(0.25)
    assert bar._bar is not None and bar._bar.n == 5 and bar._bar.postfix == "loss=0.2500"
    bar.close()
    drawn = capsys.readouterr().err
    assert "epoch 2/5:  40%" in drawn and "4/10" in drawn  # drawn at the resumed position

    caplog.set_level("INFO", logger="trainer.progress")
    plain = Progress(enabled=True, interactive=False)
    plain.start_epoch(2, 5, steps=10, done=4)
    plain.advance(0.25)
    plain.log_line(2, 14, metrics)
    assert capsys.readouterr().err == ""  # no bar escape codes in an Airflow task log
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 2/5: 10 steps (resuming at step 4)",
        "epoch 2 step 14 loss 0.25000 lr 0.001 grad_norm 0.5 1234 samples/s",
    ]

    caplog.clear()
    silent = Progress(enabled=False, interactive=False)  # ranks other than 0
    silent.start_epoch(1, 5, steps=10, done=0)
    silent.log_line(1, 1, metrics)
    assert caplog.records == []
