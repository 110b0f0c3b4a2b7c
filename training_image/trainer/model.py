"""The default model (an MLP for any task) and the factory that builds any model named by dotted path.

A factory is ``def factory(spec: ModelSpec, **kwargs) -> nn.Module``; it returns a module mapping a float
``(batch, num_features)`` tensor of raw feature values to ``(batch, num_outputs)`` raw outputs (logits
for classification). Feature scaling belongs inside the model (see :class:`Standardize`) so the exported
model takes raw features. Select one with ``model.factory: "my_pkg.models:build"``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from trainer.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

NOT_A_DISTRIBUTION = "unknown (not an installed distribution)"


@dataclass(frozen=True)
class ModelSpec:
    """What a factory needs to know about the data."""

    num_features: int
    num_outputs: int
    feature_names: tuple[str, ...]
    feature_mean: Tensor
    feature_std: Tensor


class Standardize(nn.Module):
    """``(x - mean) / std`` with train-split statistics kept as buffers (saved and exported with the model)."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        # A constant feature has std 0; dividing by 1 keeps it finite (it stays 0 after centring).
        self.register_buffer("std", torch.where(std > 0, std, torch.ones_like(std)).detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def mlp(spec: ModelSpec, hidden_sizes: Sequence[int] = (64, 32), dropout: float = 0.1) -> nn.Module:
    """Standardize -> [Linear -> ReLU -> Dropout] per hidden size -> Linear to ``num_outputs``."""
    layers: list[nn.Module] = [Standardize(spec.feature_mean, spec.feature_std)]
    width = spec.num_features
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, spec.num_outputs))
    return nn.Sequential(*layers)


def resolve_factory(dotted: str) -> Callable[..., nn.Module]:
    """Import ``package.module:function``; raise ConfigError naming the path if it does not exist."""
    module_name, _, attr = dotted.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.factory {dotted!r}: cannot import module {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model.factory {dotted!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def build_model(dotted: str, spec: ModelSpec, kwargs: dict[str, object]) -> nn.Module:
    """Build the model from its factory; bad ``model.kwargs`` are reported as a config error."""
    factory = resolve_factory(dotted)
    try:
        inspect.signature(factory).bind(spec, **kwargs)
    except TypeError as exc:
        params = [p for p in inspect.signature(factory).parameters if p != "spec"]
        raise ConfigError(
            f"model.kwargs for {dotted}: {exc}; the factory accepts: {', '.join(params)}"
        ) from None
    model = factory(spec, **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory {dotted!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def factory_package(dotted: str) -> dict[str, str] | None:
    """The package a user factory comes from, for the run's lineage: ``{"name", "version"}`` of the
    installed distribution providing its top-level module (the module name and
    :data:`NOT_A_DISTRIBUTION` for a plain module on the path); None for the trainer's own factories."""
    top = dotted.partition(":")[0].split(".")[0]
    if top == "trainer":
        return None
    distributions = importlib.metadata.packages_distributions().get(top)
    if not distributions:
        return {"name": top, "version": NOT_A_DISTRIBUTION}
    name = distributions[0]
    return {"name": name, "version": importlib.metadata.version(name)}
