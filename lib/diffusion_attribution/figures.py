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
