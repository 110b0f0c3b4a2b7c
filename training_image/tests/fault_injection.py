"""Test entry point: the trainer's command line with faults injected from outside the production code.

    torchrun ... -m fault_injection --faults '{"kill_at_step": 17, "kill_rank": 1}' train --config ...

(``TrainerRun(..., faults={...})`` runs exactly this.) The faults, each optional; a step is an optimizer
step of this process, counted from 1 at its start, which for the fresh runs the tests inject into is
the run's global step:

- ``nonfinite_loss_step`` / ``nonfinite_loss_rank`` (0): the model's output, hence the loss, is NaN in
  that step on that rank;
- ``kill_at_step`` / ``kill_rank`` (0): SIGKILL before that step's forward, on a first torchrun attempt
  only (``TORCHELASTIC_RESTART_COUNT=0``), so a torchrun restart resumes past it;
- ``hang_at_step`` / ``hang_rank`` (0): stop responding (sleep) before that step's forward, so the
  peers hit the collective timeout;
- ``step_delay_s``: sleep this long after every optimizer step: a slow run, and the lead time an async
  save needs to commit before a kill that follows it;
- ``kill_before_manifest``: rank 0 SIGKILLs itself after writing every file of that step's checkpoint
  except ``manifest.json`` (first attempt only).

How: the model factory is wrapped (forward hooks on the model it builds, so parameters, state dict and
results are exactly the uninjected run's; hooks run in training mode only), a global optimizer step
hook counts steps, and the checkpoint manager's storage is wrapped so the manifest write can be
intercepted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

from trainer import cli, loop
from trainer.checkpoint import MANIFEST, CheckpointManager, step_dir_name

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("fault_injection")


@dataclass
class Faults:
    nonfinite_loss_step: int | None = None
    nonfinite_loss_rank: int = 0
    kill_at_step: int | None = None
    kill_rank: int = 0
    hang_at_step: int | None = None
    hang_rank: int = 0
    step_delay_s: float = 0.0
    kill_before_manifest: int | None = None
    steps_done: int = 0  # optimizer steps this process has taken

    def attach(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._before_forward)
        model.register_forward_hook(self._after_forward)
        register_optimizer_step_post_hook(self._after_step)

    def _step(self) -> int:
        return self.steps_done + 1

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if not module.training:
            return
        rank = _rank()
        if self.kill_at_step == self._step() and self.kill_rank == rank and _first_attempt():
            log.warning("fault injection: SIGKILL at step %d", self._step())
            _kill()
        if self.hang_at_step == self._step() and self.hang_rank == rank:
            log.warning("fault injection: hanging at step %d", self._step())
            time.sleep(24 * 3600)  # until torchrun's SIGTERM ends it

    def _after_forward(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if module.training and self.nonfinite_loss_step == self._step() and self.nonfinite_loss_rank == _rank():
            return output * float("nan")
        return None

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps_done += 1
        if self.step_delay_s:
            time.sleep(self.step_delay_s)


class _KillBeforeManifest:
    """A checkpoint storage (fsspec filesystem) that dies instead of writing ``manifest.json`` of one step."""

    def __init__(self, fs: Any, step: int) -> None:
        self._fs = fs
        self._step = step
        self._target = f"/{step_dir_name(step)}/{MANIFEST}"

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> Any:
        if str(path).endswith(self._target) and _first_attempt():
            log.warning("fault injection: SIGKILL before the manifest of step %d", self._step)
            _kill()
        return self._fs.pipe_file(path, value, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


def install(faults: Faults) -> None:
    """Wrap the loop's model factory and checkpoint manager with ``faults``."""
    build_model = loop.build_model

    def build_with_faults(dotted: str, spec: Any, kwargs: dict[str, object]) -> nn.Module:
        model = build_model(dotted, spec, kwargs)
        faults.attach(model)
        return model

    loop.build_model = build_with_faults  # type: ignore[assignment]
    if faults.kill_before_manifest is not None:
        step = faults.kill_before_manifest

        class Manager(CheckpointManager):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.fs = _KillBeforeManifest(self.fs, step)

        loop.CheckpointManager = Manager  # type: ignore[misc]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def _kill() -> None:
    logging.shutdown()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    faults = Faults()
    if argv[:1] == ["--faults"]:
        faults = Faults(**json.loads(argv[1]))
        argv = argv[2:]
    install(faults)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
