"""The curvature data as rows, and the mode the model runs in while a fit reads them.

The data are ``N`` examples ``x0`` with ``S`` pre-drawn ``(t, eps)`` each. Row
``r = n * S + s`` is the noisy input ``x_t = q_sample(x0[n], t[n, s], eps[n, s])`` (eq. 1) with
target ``eps[n, s].flatten()``; there are ``R = N * S`` rows and ``D = C * H * W`` outputs per
row (:mod:`diffusion_attribution.curvature.kfac` states what is fitted on them). Both backends
read the rows through :func:`noisy_rows`, and both run the model in :func:`fitting_mode`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from diffusion_attribution.diffusion.ddpm import NoiseSchedule, q_sample

__all__ = ["check_draws", "fitting_mode", "noisy_rows"]


def check_draws(x0: Tensor, t: Tensor, eps: Tensor, num_timesteps: int) -> tuple[int, int]:
    """``(N, S)`` of ``x0`` (N, C, H, W), ``t`` (N, S) int in 1..T and ``eps``
    (N, S, C, H, W); raises ``ValueError`` naming the argument whose shape, dtype or range
    is wrong."""
    if x0.ndim != 4:
        raise ValueError(f"x0 must have shape (N, C, H, W), got {tuple(x0.shape)}")
    if t.ndim != 2 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape (N, S) with N={x0.shape[0]}, got {tuple(t.shape)}")
    n, s = t.shape
    if tuple(eps.shape) != (n, s, *x0.shape[1:]):
        raise ValueError(f"eps must have shape {(n, s, *x0.shape[1:])}, got {tuple(eps.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"t must be an integer tensor, got {t.dtype}")
    if n * s == 0:
        raise ValueError("need at least one example and one draw")
    if int(t.min()) < 1 or int(t.max()) > num_timesteps:
        raise ValueError(f"timesteps must lie in 1..{num_timesteps}")
    return n, s


def noisy_rows(
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    start: int = 0,
    stop: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``start..stop-1`` of the curvature data (row ``r = n * S + s``).

    ``x0`` (N, C, H, W), ``t`` (N, S) int, ``eps`` (N, S, C, H, W). Returns the noisy inputs
    ``x_t = sqrt(alpha_bar_t) x0[n] + sqrt(1 - alpha_bar_t) eps[n, s]`` (B, C, H, W) (eq. 1),
    their timesteps (B,) and the regression targets ``eps[n, s].flatten()`` (B, D).
    """
    n, s = t.shape
    stop = n * s if stop is None else min(stop, n * s)
    rows = torch.arange(start, stop, device=t.device)
    x0_r = x0[(rows // s).to(x0.device)]
    t_r = t.reshape(-1)[rows]
    eps_r = eps.reshape(n * s, *x0.shape[1:])[rows.to(eps.device)].to(x0_r.dtype)
    return q_sample(schedule, x0_r, t_r, eps_r), t_r, eps_r.flatten(1)


@contextmanager
def fitting_mode(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Eval mode (no dropout: the factors must be deterministic), grads enabled for ``params``;
    the model's mode and the parameters' ``requires_grad`` are restored afterwards."""
    was_training = model.training
    requires = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)
        for p, r in zip(params, requires, strict=True):
            p.requires_grad_(r)
