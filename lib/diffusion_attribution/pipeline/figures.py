"""Shared plotting helpers; a notebook saves each figure as a PNG under ``reports/figures/``
(:meth:`~diffusion_attribution.pipeline.workspace.Workspace.save_figure`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from diffusion_attribution.diffusion.datasets import image_grid


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


# ---- LDS figures (evaluate, observations) ----------------------------------------------------

#: Colours of the groups of Figs. 2 and 17.
LDS_COLORS = {
    "correct measurement": "tab:blue",
    "substituted measurement": "tab:orange",
    "similarity (no Hessian / no model)": "tab:gray",
    "exact retraining": "tab:green",
}


def lds_bars(bars: dict, title: str, shape: tuple[int, int, int]) -> plt.Figure:
    """Figs. 2a, 2b, 17: one horizontal bar per method, ``bars`` = {label: {"lds", "stderr",
    "group"}} (error bars: standard error over samples), coloured by group."""
    labels = list(bars)
    means = [bars[k]["lds"] for k in labels]
    errs = [bars[k]["stderr"] for k in labels]
    groups = [bars[k]["group"] for k in labels]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.8))
    y = np.arange(len(labels))[::-1]
    ax.barh(y, means, xerr=errs, color=[LDS_COLORS[g] for g in groups], capsize=3)
    for yi, m, e in zip(y, means, errs, strict=True):
        ax.text(max(m, 0) + e + 0.01, yi, f"{m:.3f} ± {e:.3f}", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.axvline(0, color="k", lw=0.6)
    Q, M, K = shape
    ax.set(
        xlabel=f"LDS ({Q} samples, M = {M} subsets, K = {K} seeds)",
        title=title,
        xlim=(min(0, min(means) - 0.05), 1.0),
    )
    used = [g for g in LDS_COLORS if g in set(groups)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=LDS_COLORS[g]) for g in used]
    ax.legend(
        handles,
        used,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.45, -0.12 * 9 / len(labels) - 0.1),
        ncol=2,
    )
    fig.tight_layout()
    return fig


def grouped_bars(
    values: dict,
    groups: list[str],
    series: list[str],
    names: dict,
    title: str,
    labels: dict | None = None,
) -> plt.Figure:
    """Fig. 4: bars of ``values[(group, series)] = (lds, stderr)``, one cluster per group
    (tick label ``labels[group]``, default the group's name)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(series)
    for j, s in enumerate(series):
        xs = [
            i + (j - (len(series) - 1) / 2) * width
            for i, g in enumerate(groups)
            if (g, s) in values
        ]
        rs = [values[(g, s)] for g in groups if (g, s) in values]
        ax.bar(xs, [r[0] for r in rs], width, yerr=[r[1] for r in rs], capsize=3, label=names[s])
        for x, r in zip(xs, rs, strict=True):
            ax.text(x, max(r[0], 0) + r[1] + 0.01, f"{r[0]:.2f}", ha="center", fontsize=7)
    labels = labels or {"elbo": "ELBO"}
    ax.set_xticks(range(len(groups)), [labels.get(g, g) for g in groups])
    ax.axhline(0, color="k", lw=0.6)
    ax.set(ylabel="LDS", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def damping_curves(
    curves: dict, xlabel: str, title: str, x: str = "damping", capsize: float = 3
) -> plt.Figure:
    """Figs. 7, 8: LDS (with standard errors) against damping, one line per
    ``curves[label] = (table rows, line style)``; rows need ``x``, ``lds`` and ``stderr``."""
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for label, (t, style) in curves.items():
        if len(t):
            ax.errorbar(
                t[x], t.lds, yerr=t.stderr, marker="o", ls=style, capsize=capsize, label=label
            )
    ax.set(xscale="log", xlabel=xlabel, ylabel="LDS", title=title)
    ax.legend(fontsize=7 if len(curves) > 3 else 8)
    fig.tight_layout()
    return fig


def heatmap(df, title: str) -> plt.Figure:
    """Figs. 11, 12: a matrix of LDS values (rows: the predicted l_t; columns: the l_t' used)."""
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    im = ax.imshow(
        df.to_numpy(), cmap="viridis", vmin=min(0.0, float(np.nanmin(df.to_numpy()))), vmax=1.0
    )
    for i in range(len(df)):
        for k in range(len(df)):
            ax.text(k, i, f"{df.iat[i, k]:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(df)), [c.replace("l_t=", "") for c in df.columns])
    ax.set_yticks(range(len(df)), [c.replace("l_t=", "") for c in df.index])
    ax.set(
        xlabel="t' of the substituted measurement l_t'",
        ylabel="t of the predicted l_t",
        title=title,
    )
    fig.colorbar(im, ax=ax, label="LDS")
    fig.tight_layout()
    return fig


def predicted_vs_actual(ax: plt.Axes, predicted: Tensor, actual: Tensor, title: str) -> None:
    """Figs. 13, 14: predicted against actual change per (sample, subset), one colour per sample."""
    for q in range(len(predicted)):
        ax.scatter(predicted[q], actual[q], s=6, color=plt.cm.tab20(q % 20))
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set(xlabel="predicted change (K-FAC influence)", ylabel="actual change", title=title)


def class_influences(
    queries: Tensor,
    classes: Tensor,
    train_images: Tensor,
    train_labels: Tensor,
    scores: Tensor,
    shares,
    chance: float,
    labels: dict[str, str],
    k: int = 5,
) -> plt.Figure:
    """Left: for the first sample of each class (rows), the sample, its ``k`` most positive and
    ``k`` most negative influences by ``scores`` (each training image titled with its class).
    Right: per method and removed fraction, the mean share of a sample's top influences that
    share its class (``shares``: a DataFrame with columns method, fraction, mean, stderr),
    against ``chance`` (the training set's share of the sample's class)."""
    rows = [int(torch.nonzero(classes == c)[0]) for c in torch.unique(classes).tolist()]
    fig = plt.figure(figsize=(15, 0.85 * len(rows) + 1.6))
    grid = fig.add_gridspec(1, 2, width_ratios=[2.3, 1], wspace=0.12)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.5 / fig.get_figheight(), bottom=0.22)
    widths = [1.0, 0.3] + [1.0] * k + [0.3] + [1.0] * k
    left = grid[0].subgridspec(len(rows), len(widths), width_ratios=widths, hspace=0.55)
    cols = [0] + [2 + i for i in range(k)] + [3 + k + i for i in range(k)]
    heads = {}
    for r, q in enumerate(rows):
        order = scores[q].argsort(descending=True)
        picks = [None, *order[:k].tolist(), *order.flip(0)[:k].tolist()]
        for col, j in zip(cols, picks, strict=True):
            ax = fig.add_subplot(left[r, col])
            img = queries[q] if j is None else train_images[j]
            ax.imshow(
                (img.clamp(-1, 1).permute(1, 2, 0).squeeze(-1) + 1) / 2, cmap="gray", vmin=0, vmax=1
            )
            ax.axis("off")
            same = j is not None and int(train_labels[j]) == int(classes[q])
            text = f"sample: {int(classes[q])}" if j is None else str(int(train_labels[j]))
            ax.set_title(text, fontsize=7, color="tab:green" if same else "k", pad=2)
            if r == 0 and col in (0, 2, 3 + k):
                heads[col] = ax
    for col, text in ((2, f"top {k} positive influences (green: the sample's class)"),
                      (3 + k, f"top {k} negative influences")):  # fmt: skip
        box = heads[col].get_position()
        fig.text(box.x0, box.y1 + 0.25 / fig.get_figheight(), text, fontsize=9)
    ax = fig.add_subplot(grid[1])
    methods = list(dict.fromkeys(shares.method))
    fractions = sorted(set(shares.fraction))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        for i, frac in enumerate(fractions):
            row = shares[(shares.method == method) & (shares.fraction == frac)].iloc[0]
            x = i + (j - (len(methods) - 1) / 2) * width
            ax.bar(x, row["mean"], width, yerr=row["stderr"], color=f"C{j}",
                   label=labels.get(method, method) if i == 0 else None)  # fmt: skip
    ax.axhline(chance, color="k", ls="--", lw=0.8, label="chance (the class's share of the data)")
    ax.set_xticks(range(len(fractions)), [f"top {f:.0%} of the data" for f in fractions])
    ax.set(ylim=(0, 1), ylabel="share in the sample's class")
    ax.set_title("Top influences in the sample's class (mean ± s.e.)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    return fig
