"""Similarity baselines: context for the attribution methods, not influence estimates.

:func:`pixel_similarity`, :func:`gradient_dot` and :func:`gradient_cosine` are *not* influence
estimates: they do not predict m(theta_{-j}, x_q) - m(theta, x_q) and have no units of m. They
are context ("does a method beat looking alike?"). They share the (Q, N) float32 format and
the direction of the score convention of :mod:`diffusion_attribution.attribution.influence` (larger = x_j
more "responsible" for x_q, which for the loss measurement means removing x_j should increase
the query's loss), but not its scale. :func:`gradient_dot` is the first-order score with the
identity in place of the Hessian.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gradient_cosine", "gradient_dot", "pixel_similarity"]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).double()


def pixel_similarity(queries: Tensor, train: Tensor, bandwidth: float | None = None) -> Tensor:
    """exp(-||x_q - x_j||^2 / (2 h^2)) (Q, N) float32: a model-free "looks alike" baseline.

    ``bandwidth`` h defaults to the median of the Q x N query-train distances. Not an influence
    estimate (module docstring).
    """
    d2 = torch.cdist(_flat(queries), _flat(train)).pow(2)
    if bandwidth is None:
        h = float(d2.sqrt().median())
        if h == 0:
            raise ValueError("median query-train distance is 0; pass a bandwidth")
    else:
        h = float(bandwidth)
        if not h > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    return torch.exp(-d2 / (2 * h * h)).float()


def gradient_dot(query: Tensor, train: Tensor, num_train: int | None = None) -> Tensor:
    """(1/N) g_q^T g_j (Q, N) float32: eq. 6 with the identity in place of the Hessian.

    Works on raw gradients or on projected features (then approximately, by JL). Context only:
    the identity has the wrong scale to predict retraining (module docstring).
    """
    n = train.shape[0] if num_train is None else int(num_train)
    return (_flat(query) @ _flat(train).T / n).float()


def gradient_cosine(query: Tensor, train: Tensor, eps: float = 1e-30) -> Tensor:
    """cos(g_q, g_j) (Q, N) float32 in [-1, 1]. Context only (module docstring)."""
    q, t = _flat(query), _flat(train)
    q = q / q.norm(dim=1, keepdim=True).clamp(min=eps)
    t = t / t.norm(dim=1, keepdim=True).clamp(min=eps)
    return (q @ t.T).float()
