"""Model factories for tests: user models the trainer must handle (or refuse) through ``model.factory``.

Importable by the trainer processes the tests start (``TrainerRun`` puts this directory on their
``PYTHONPATH``); each follows the factory contract of training_image/README.md except where its
docstring says which rule it breaks on purpose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.model import Standardize, mlp

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trainer.model import ModelSpec


class _SignBranch(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.scale = Standardize(spec.feature_mean, spec.feature_std)
        self.head = nn.Linear(spec.num_features, spec.num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        x = self.scale(x)
        if x.sum() > 0:  # Python control flow on a tensor's value: torch.export cannot trace this
            return self.head(x)
        return -self.head(x)


def unexportable(spec: ModelSpec) -> nn.Module:
    """Trains fine, but breaks the export rule (data-dependent Python control flow)."""
    return _SignBranch(spec)


class _TwoHeads(nn.Module):
    def __init__(self, spec: ModelSpec, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            Standardize(spec.feature_mean, spec.feature_std), nn.Linear(spec.num_features, hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, spec.num_outputs)
        self.auxiliary_head = nn.Linear(hidden, spec.num_outputs)  # never used in forward

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def unused_head(spec: ModelSpec, hidden: int = 8) -> nn.Module:
    """A model with a parameter that never gets a gradient: DDP needs distributed.find_unused_parameters."""
    return _TwoHeads(spec, hidden)


class _NanAtStep(nn.Module):
    def __init__(self, inner: nn.Module, step: int, rank: int) -> None:
        super().__init__()
        self.inner = inner
        self.step, self.rank = step, rank
        self.calls = 0  # training forwards of this process (one per optimizer step without accumulation)

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        if not self.training:
            return out
        self.calls += 1
        this_rank = dist.get_rank() if dist.is_initialized() else 0
        if self.calls == self.step and this_rank == self.rank:
            return out * torch.tensor(float("nan"))
        return out


def nan_at_step(
    spec: ModelSpec,
    step: int,
    rank: int = 0,
    hidden_sizes: Sequence[int] = (16,),
    dropout: float = 0.1,
) -> nn.Module:
    """``mlp`` whose output (so the loss) is NaN at the ``step``-th training forward on ``rank``."""
    return _NanAtStep(mlp(spec, hidden_sizes=hidden_sizes, dropout=dropout), step, rank)
