"""What a checkpoint holds besides the model and optimizer tensors DCP saves as they are: each rank's RNG
streams (torch, CUDA, python's ``random``, numpy's ``np.random``) and the optimizer's per-parameter state,
as plain tensors, so that they are checkpointed like the rest and never pickled."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from torch import nn

def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def tensor_leaves(optim_state: dict[str, Any]) -> dict[str, Any]:
    """Tensor part of the FQN-keyed optimizer state (all of it is tensors for AdamW/SGD)."""
    return {
        fqn: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for fqn, s in optim_state.items()
    }


def rng_state(rank: int) -> dict[str, torch.Tensor]:
    """This rank's global RNG states (torch, CUDA, python's ``random``, numpy's legacy ``np.random``) as
    tensors, so they are checkpointed like the rest (and never pickled)."""
    state = {
        f"torch_rank{rank}": torch.get_rng_state(),
        f"python_rank{rank}": _python_rng_tensor(random.getstate()),
        f"numpy_rank{rank}": _numpy_rng_tensor(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state[f"cuda_rank{rank}"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], rank: int) -> None:
    torch.set_rng_state(state[f"torch_rank{rank}"])
    random.setstate(_python_rng_state(state[f"python_rank{rank}"]))
    np.random.set_state(_numpy_rng_state(state[f"numpy_rank{rank}"]))
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state[f"cuda_rank{rank}"])


# Python's Mersenne Twister state is (version, 625 words, cached gauss or None); numpy's legacy one is
# ("MT19937", 624 words, position, has_gauss, cached_gaussian). Both become one int64 tensor each, a
# cached normal as its float64 bits.
def _float_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float64).view(torch.int64).item())


def _bits_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int64).view(torch.float64).item())


def _python_rng_tensor(state: tuple[Any, ...]) -> torch.Tensor:
    version, words, gauss = state
    cached = [0, 0] if gauss is None else [1, _float_bits(gauss)]
    return torch.tensor([version, *words, *cached], dtype=torch.int64)


def _python_rng_state(tensor: torch.Tensor) -> tuple[Any, ...]:
    values = tensor.tolist()
    version, words, (has_gauss, gauss) = values[0], tuple(values[1:-2]), values[-2:]
    return version, words, _bits_float(gauss) if has_gauss else None


def _numpy_rng_tensor(state: tuple[Any, ...]) -> torch.Tensor:
    _, words, position, has_gauss, gauss = state  # the legacy global RandomState is always MT19937
    return torch.tensor([*words.tolist(), position, has_gauss, _float_bits(gauss)], dtype=torch.int64)


def _numpy_rng_state(tensor: torch.Tensor) -> tuple[Any, ...]:
    values = tensor.tolist()
    words = np.array(values[:-3], dtype=np.uint32)
    return "MT19937", words, values[-3], values[-2], _bits_float(values[-1])
