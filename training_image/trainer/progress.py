"""Progress on rank 0: a tqdm bar when attached to a terminal, plain log lines otherwise (Airflow logs)."""

from __future__ import annotations

import logging

from tqdm import tqdm

log = logging.getLogger("trainer.progress")


class Progress:
    """Epoch/step progress with loss, samples/s and ETA; silent on ranks other than 0."""

    def __init__(self, enabled: bool, interactive: bool) -> None:
        self.enabled = enabled
        self.interactive = interactive
        self._bar: tqdm | None = None

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        if not self.enabled:
            return
        self.close()
        if self.interactive:
            self._bar = tqdm(
                total=steps, initial=done, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False
            )
        else:
            log.info(
                "epoch %d/%d: %d steps%s", epoch, epochs, steps, f" (resuming at step {done})" if done else ""
            )

    def advance(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def log_line(self, epoch: int, global_step: int, metrics: dict[str, float]) -> None:
        if self.enabled and self._bar is None:
            log.info(
                "epoch %d step %d loss %.5f lr %.3g grad_norm %.3g %.0f samples/s",
                epoch,
                global_step,
                metrics["loss"],
                metrics["lr"],
                metrics["grad_norm"],
                metrics["samples_per_s"],
            )

    def log_eval(self, epoch: int, metrics: dict[str, float], stop: str | None) -> None:
        if not self.enabled:
            return
        self.close()
        shown = " ".join(f"{k} {v:.5f}" for k, v in sorted(metrics.items()))
        log.info("epoch %d eval: %s%s", epoch, shown, f" -> stopping ({stop})" if stop else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
