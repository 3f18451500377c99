"""Pictures of a run's progress, returned as PIL images for MLflow (drawing never logs or prints)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def figure_png(fig: Any) -> Image.Image:
    """A matplotlib figure as an RGB image, cropped to what is drawn (MLflow logs PIL images)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def learning_curves(history: list[dict[str, float]]) -> Image.Image:
    """Loss and every other train/val metric per epoch, one panel per metric family."""
    epochs = [int(h["epoch"]) for h in history]
    families = sorted({k.split("_", 1)[1] for h in history for k in h if k.startswith(("train_", "val_"))})
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(4 * max(len(families), 1), 3), squeeze=False)
    for ax, family in zip(axes[0], families):
        for split in ("train", "val"):
            key = f"{split}_{family}"
            points = [(e, h[key]) for e, h in zip(epochs, history) if key in h]
            if points:
                ax.plot(*zip(*points), marker="o", label=split)
        ax.set_title(family)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    image = figure_png(fig)
    plt.close(fig)
    return image


def metric_vs_params(trials: list[dict[str, Any]], metric: str, params: list[str]) -> Image.Image:
    """A sweep's trials: ``metric`` against each searched hyperparameter (log axis where it spans > 20x)."""
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3), squeeze=False)
    for ax, param in zip(axes[0], params):
        xs = [t[param] for t in trials]
        ys = [t[metric] for t in trials]
        numeric = all(isinstance(x, (int, float)) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], ys)
        if numeric and all(x > 0 for x in xs) and max(xs) / max(min(xs), 1e-12) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
    fig.tight_layout()
    image = figure_png(fig)
    plt.close(fig)
    return image
