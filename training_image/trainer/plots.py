"""The loss/metric curve logged as a PNG artifact."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the trainer runs in containers and Airflow workers

from matplotlib import pyplot as plt  # noqa: E402


def curve_figure(history: list[dict[str, float]]) -> Any:
    """Train/val loss per evaluation on the left, the other validation metrics on the right."""
    steps = [h["step"] for h in history]
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            loss_ax.plot(*zip(*points, strict=True), marker="o", label=key)
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_title("loss")
    loss_ax.legend()
    for key in sorted({k for h in history for k in h} - {"val_loss", "train_loss", "epoch", "step", "lr"}):
        metric_ax.plot(steps, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    metric_ax.set_xlabel("optimizer step")
    metric_ax.set_title("validation metrics")
    metric_ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig
