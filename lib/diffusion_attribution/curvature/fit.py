"""The fit: :func:`fit_kfac`, K-FAC or EK-FAC of the GGN of the diffusion loss (paper Sec. 3.1).

One entry point for both backends: the hooks (:mod:`~diffusion_attribution.curvature.hooks`,
the default) and curvlinops (:mod:`~diffusion_attribution.curvature.curvlinops_backend`, the
reference). Either returns a :class:`~diffusion_attribution.curvature.kfac.KFAC`, whose module
docstring states the matrix approximated, its rows and its normalisation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from diffusion_attribution.curvature.curvlinops_backend import build_operator, kfac_from_operator
from diffusion_attribution.curvature.hooks import correction_sums, factor_sums
from diffusion_attribution.curvature.kfac import KFAC, FisherKind, KFACKind
from diffusion_attribution.curvature.kronecker import Precision
from diffusion_attribution.curvature.partial_sums import apply_corrections, to_kfac
from diffusion_attribution.curvature.rows import fitting_mode
from diffusion_attribution.diffusion.ddpm import NoiseSchedule

__all__ = ["Backend", "fit_kfac"]

Backend = Literal["hooks", "curvlinops"]
"""Who computes the factors: this project's hooks (:mod:`diffusion_attribution.curvature.hooks`,
shard-invariant MC noise) or curvlinops 3.0.1 (the independent reference)."""


def fit_kfac(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    *,
    fisher: FisherKind = "mc",
    kfac: KFACKind = "expand",
    batch_size: int = 256,
    mc_seed: int = 0,
    mc_samples: int = 1,
    ekfac: bool = False,
    separate_weight_and_bias: bool = True,
    progress: bool = False,
    backend: Backend = "hooks",
    precision: Precision = "float64",
    labels: Tensor | None = None,
) -> KFAC:
    """Fit K-FAC (or EK-FAC) of the GGN of the diffusion loss over ``N * S`` noisy rows.

    ``model``: eps-model ``(x_t, t) -> eps`` (an ``nn.Module``); ``params``: the parameters
    to cover (Linear / Conv2d weights and biases only, normally ``kfac_parameters(model)``);
    ``x0`` (N, C, H, W); ``t`` (N, S) int64 timesteps in 1..T; ``eps`` (N, S, C, H, W): S
    pre-drawn ``(t, eps)`` per example. Rows are streamed lazily in batches of about
    ``batch_size`` with one pass over the data (two with ``ekfac``). The model runs in eval
    mode (restored afterwards). See :mod:`~diffusion_attribution.curvature.kfac`'s module
    docstring for the matrix approximated and its scaling.

    ``backend="hooks"`` (default) computes the factors with this project's hooks
    (:mod:`diffusion_attribution.curvature.hooks`): the MC noise of example n depends only on
    ``(mc_seed, n)``, so the fit is the sum of fits on shards of examples
    (:func:`~diffusion_attribution.curvature.hooks.factor_sums`). ``backend="curvlinops"``
    fits with curvlinops 3.0.1, the independent reference: the same matrices, but its MC
    targets come from one generator seeded with ``mc_seed`` and running across its batches (the
    draws depend on ``batch_size``), so its MC factors agree with the hooks' in expectation only;
    the empirical and type-2 factors agree to float round-off. ``meta["backend"]`` records
    which one ran. ``precision``: the dtype of the eigendecompositions and of every tensor the
    result keeps (:mod:`~diffusion_attribution.curvature.kronecker`); the factors are summed in
    float64 either way. ``labels`` (N,): each example's class, for a
    :class:`~diffusion_attribution.diffusion.conditional.ConditionalUNet` (the hooks bind
    the model to each run of equal labels, curvlinops gets them per row in its input dict).
    """
    if backend not in ("hooks", "curvlinops"):
        raise ValueError(f"backend must be 'hooks' or 'curvlinops', got {backend!r}")
    params = list(params)
    t0 = time.perf_counter()
    meta = {
        "backend": backend,
        "fisher": fisher,
        "kfac": kfac,
        "ekfac": ekfac,
        "separate_weight_and_bias": separate_weight_and_bias,
        "num_examples": t.shape[0],
        "draws_per_example": t.shape[1],
        "num_rows": t.numel(),
        "output_dim": math.prod(x0.shape[1:]),
        "mc_seed": mc_seed,
        "mc_samples": mc_samples,
        "batch_size": batch_size,
        "precision": precision,
    }
    if backend == "hooks":
        kw = dict(batch_size=batch_size, mc_seed=mc_seed, mc_samples=mc_samples, labels=labels)
        sums = factor_sums(model, params, schedule, x0, t, eps, fisher=fisher, kfac=kfac, **kw)
        result = to_kfac(
            sums, separate_weight_and_bias=separate_weight_and_bias, meta=meta, precision=precision
        )
        if ekfac:
            corr = correction_sums(model, params, schedule, x0, t, eps, result, fisher=fisher, **kw)
            result = apply_corrections(result, corr)
    else:
        with fitting_mode(model, params):
            op = build_operator(
                model,
                params,
                schedule,
                x0,
                t,
                eps,
                fisher=fisher,
                kfac=kfac,
                batch_size=batch_size,
                mc_seed=mc_seed,
                mc_samples=mc_samples,
                ekfac=ekfac,
                separate_weight_and_bias=separate_weight_and_bias,
                progress=progress,
                labels=labels,
            )
            result = kfac_from_operator(op, params, meta=meta, precision=precision)
    result.meta["fit_seconds"] = time.perf_counter() - t0
    return result
