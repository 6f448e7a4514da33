"""The one interface through which a curvature reaches the layers that use it.

K-FAC influence (eq. 6) needs the damped inverse of a curvature K applied to gradients,
``(K + lambda I)^{-1} g``, and nothing else of it. The attribution layer asks for exactly
that, so it never imports the curvature layer that fits K; :class:`~diffusion_attribution.curvature.kfac.KFAC`
and :class:`~diffusion_attribution.curvature.kfac.DenseCurvature` satisfy it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class InverseCurvature(Protocol):
    """Applies ``(K + damping I)^{-1}`` to the rows of ``V`` (flat parameter vectors, shape
    (P,) or (Q, P)); ``inverse_apply_sweep`` does it for several dampings, sharing the work."""

    def inverse_apply(self, V: Tensor, damping: float) -> Tensor: ...

    def inverse_apply_sweep(self, V: Tensor, dampings: Sequence[float]) -> dict[float, Tensor]: ...
