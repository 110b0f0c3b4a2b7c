"""Task types: how model outputs become a loss, predictions and validation metrics.

Binary classification outputs one logit; multiclass outputs one logit per class;
regression outputs one value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryAveragePrecision,
    MulticlassAccuracy,
    MulticlassAUROC,
)
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError


@dataclass(frozen=True)
class Task:
    """Loss, prediction transform and metrics for one task type."""

    type: str
    num_classes: int | None = None

    @property
    def label_dtype(self) -> torch.dtype:
        return torch.int64 if self.type == "multiclass" else torch.float32

    def loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """Task loss of raw model outputs; ``reduction`` is "mean", "sum" or "none" (per sample)."""
        if self.type == "binary":
            return F.binary_cross_entropy_with_logits(output.squeeze(-1), target, reduction=reduction)
        if self.type == "multiclass":
            return F.cross_entropy(output, target, reduction=reduction)
        return F.mse_loss(output.squeeze(-1), target, reduction=reduction)

    def predict(self, output: Tensor) -> Tensor:
        """Model output -> served prediction: probability of class 1, class probabilities, or value."""
        if self.type == "binary":
            return torch.sigmoid(output.squeeze(-1))
        if self.type == "multiclass":
            return torch.softmax(output, dim=-1)
        return output.squeeze(-1)

    @property
    def output_columns(self) -> list[str]:
        """Names of the served model's output columns (``trainer.serving``), one per ``predict`` output."""
        if self.type == "binary":
            return ["score"]
        if self.type == "multiclass":
            return [f"class_{k}" for k in range(self.num_classes or 0)]
        return ["prediction"]

    def metrics(self) -> MetricCollection:
        """Metrics over predictions (not logits); names without the split prefix."""
        if self.type == "binary":
            return MetricCollection(
                {"roc_auc": BinaryAUROC(), "pr_auc": BinaryAveragePrecision(), "accuracy": BinaryAccuracy()}
            )
        if self.type == "multiclass":
            assert self.num_classes is not None  # guaranteed by TaskConfig validation
            return MetricCollection(
                {
                    "accuracy": MulticlassAccuracy(num_classes=self.num_classes, average="micro"),
                    "roc_auc": MulticlassAUROC(num_classes=self.num_classes),
                }
            )
        return MetricCollection({"rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError()})

    def metric_target(self, target: Tensor) -> Tensor:
        """Targets as the metrics expect them (integer labels for classification)."""
        return target.long() if self.type == "binary" else target
