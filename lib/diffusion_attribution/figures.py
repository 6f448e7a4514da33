"""Shared plotting helpers: every figure is a PNG under ``reports/figures/``."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from torch import Tensor

from .data import image_grid

FIGURES = Path("reports/figures")


def save_figure(fig: plt.Figure, name: str, root: str | Path = ".") -> Path:
    """Save ``fig`` as ``reports/figures/<name>`` (PNG, 150 dpi) and return the path."""
    path = Path(root) / FIGURES / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def show_images(ax: plt.Axes, images: Tensor, nrow: int, title: str = "") -> None:
    """Draw images in [-1, 1] as one grid on ``ax`` (grey for one channel)."""
    grid = image_grid(images, nrow)
    ax.imshow(
        grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_title(title)
    ax.axis("off")


def plot_top_influences(
    queries: Tensor, train_images: Tensor, scores: Tensor, query_ids: list[int], k: int = 6
) -> plt.Figure:
    """Fig. 1: for each query (row), the query, then the ``k`` training images with the most
    positive scores (removal predicted to increase the measurement most), the ``k`` most
    negative, and the ``k`` most neutral (scores closest to zero)."""
    groups = ["generated", "top positive", "top negative", "most neutral"]
    widths = [1.0, 0.4] + ([1.0] * k + [0.4]) * 2 + [1.0] * k  # narrow spacer columns
    fig, axes = plt.subplots(
        len(query_ids),
        len(widths),
        squeeze=False,
        figsize=(0.62 * sum(widths) + 0.6, 0.75 * len(query_ids) + 0.5),
        gridspec_kw={"width_ratios": widths, "wspace": 0.08, "hspace": 0.12},
    )
    image_cols = [0] + [2 + g * (k + 1) + i for g in range(3) for i in range(k)]
    for row, q in enumerate(query_ids):
        order = scores[q].argsort(descending=True)
        neutral = scores[q].abs().argsort()[:k]
        picks = [queries[q]] + [train_images[i] for i in (*order[:k], *order.flip(0)[:k], *neutral)]
        for ax in axes[row]:
            ax.axis("off")
        for col, img in zip(image_cols, picks, strict=True):
            ax = axes[row, col]
            ax.imshow(
                (img.clamp(-1, 1).permute(1, 2, 0).squeeze(-1) + 1) / 2, cmap="gray", vmin=0, vmax=1
            )
    for g, col in enumerate([0, 2, 3 + k, 4 + 2 * k]):
        axes[0, col].set_title(groups[g], fontsize=9, loc="left")
    return fig
