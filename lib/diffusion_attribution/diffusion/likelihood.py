"""The discretised Gaussian decoder of the ELBO (Ho et al., 2020, eq. 13) and the pixel grid
it is a probability mass on: :func:`quantize` rounds images to ``levels`` values in [-1, 1];
:func:`discretized_gaussian_log_likelihood` is log p(x_0 | x_1) per pixel, computed stably in
both tails (used by :class:`~diffusion_attribution.diffusion.measurements.ELBO`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["discretized_gaussian_log_likelihood", "quantize"]


def quantize(x: Tensor, levels: int) -> Tensor:
    """Round ``x`` to the nearest of ``levels`` equally spaced values in [-1, 1] (clipped).

    Use it on generated samples before the ELBO: its decoder term is a probability mass on
    this grid (e.g. 256 levels for 8-bit images, 17 for sklearn's digits 0..16).
    """
    k = levels - 1
    return torch.round((x.clamp(-1, 1) + 1) * (k / 2)) / (k / 2) - 1


def _log_ndtr(x: Tensor) -> Tensor:
    """log Phi(x), stable in both tails, from erfcx/erfc (unlike ``torch.special.log_ndtr``,
    these have ``torch.func.vmap`` batching rules). Each branch sees a clamped argument so the
    unused one stays finite and passes no NaN gradient through ``torch.where``."""
    neg, pos = x.clamp(max=0), x.clamp(min=0)
    left = torch.log(0.5 * torch.special.erfcx(-neg / math.sqrt(2))) - 0.5 * neg.pow(2)
    right = torch.log1p(-0.5 * torch.special.erfc(pos / math.sqrt(2)))
    return torch.where(x < 0, left, right)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler, 2012)."""
    return torch.where(
        x > -math.log(2.0),
        torch.log(-torch.expm1(x.clamp(max=-1e-300 if x.dtype == torch.float64 else -1e-38))),
        torch.log1p(-torch.exp(x)),
    )


def discretized_gaussian_log_likelihood(
    x0: Tensor, mean: Tensor, std: Tensor | float, levels: int
) -> Tensor:
    """log p(x0 | x1) of Ho et al. (2020, eq. 13), per pixel (same shape as ``x0``).

    Each pixel of ``x0`` is one of ``levels`` values in [-1, 1] (spacing 2 delta with
    delta = 1 / (levels - 1)); its probability is the N(mean, std^2) mass of its bin
    [x0 - delta, x0 + delta], with the outer edges of the extreme bins at -inf / +inf. The
    log of a difference of normal CDFs is computed stably (by symmetry the bin is first
    moved left of 0, then log Phi(b) + log(1 - Phi(a)/Phi(b))), so gradients stay finite.
    """
    delta = 1.0 / (levels - 1)
    a = (x0 - delta - mean) / std  # standardised lower edge
    b = (x0 + delta - mean) / std  # standardised upper edge
    flip = a + b > 0  # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): use the side left of 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi = _log_ndtr(hi)
    interior = log_hi + _log1mexp(_log_ndtr(lo) - log_hi)
    lowest = _log_ndtr(b)  # bin (-inf, x0 + delta]
    highest = _log_ndtr(-a)  # bin [x0 - delta, +inf)
    return torch.where(x0 < -1 + delta, lowest, torch.where(x0 > 1 - delta, highest, interior))
