"""TRAK and D-TRAK for diffusion models (paper Sec. 3.1, 4, App. G.3.1).

What TRAK is in the paper's framework
-------------------------------------
TRAK as formulated for diffusion models (Georgiev et al., 2023; Zheng et al., 2024) is eq. 6
with the *empirical Fisher* GGN^loss of eq. 11 as the Hessian approximation, evaluated in a
random projection of the per-example gradients (App. G.3.1: damping added in the projected
space). With Phi (N, k) the projected training gradients phi_j = R^T grad lbar(x_j) / sqrt(k)
and phi_q = R^T grad m(x_q) / sqrt(k) the projected query gradient,

    F = Phi^T Phi / N                                  (projected GGN^loss, eq. 11)
    score[q, j] = (1 / N) * phi_q^T (F + lambda I)^{-1} phi_j ~ m(theta_{-j}, x_q) - m(theta, x_q),

the convention of :mod:`diffusion_attribution.attribution.influence` (float32 (Q, N), lbar = l / D,
positive = removing x_j increases m), with lambda already "normalised by the dataset size N"
as the paper reports it (App. G.3.1). TRAK's own code solves (Phi^T Phi + lambda_TRAK I)
instead, so lambda_TRAK = N * lambda for the same features (:func:`trak_lambda`).

* **TRAK**: Phi from gradients of the diffusion loss (:class:`~.measurements.DiffusionLoss`),
  queries from the gradient of the attributed measurement (loss, ELBO, ...).
* **D-TRAK** (Zheng et al., 2024): the square norm ||eps_theta||^2
  (:class:`~.measurements.SquareNorm`) replaces the loss in *both* the training gradients (and
  hence in F) and the query gradients, whatever measurement is being attributed.

No per-example weight. traker's classification outputs multiply every training example's
score by Q_j = 1 - p_j (one minus the probability of the correct class, its "out-to-loss"
term). The diffusion versions have no such term (Zheng et al.'s scores are
features @ (X^T X + lambda I)^{-1} @ target^T, i.e. Q_j = 1), and neither has this module.

Precision
---------
``"float32"`` and ``"float64"`` store the features in that format and solve in float64 (a
Cholesky factorisation of the smaller of F and the Gram matrix, or one eigendecomposition for a
damping sweep). ``"float16"`` instead runs traker 0.3.2's own score computer
(``trak.score_computers.BasicScoreComputer``, which ``TRAKer(use_half_precision=True)``, its
default, uses) step by step, because that pipeline, not the rounding of the features alone, is
what degrades the scores in the paper's Fig. 18:

1. features Phi and queries rounded to float16 (traker stores them so);
2. X^T X = Phi^T Phi as float16 matmuls (float16 in and out; the backend picks the internal
   accumulation), summed in float16 over blocks of 20 000 rows;
3. the damping lambda_TRAK = N * lambda (:func:`trak_lambda`) rounded to float16 and added to
   the diagonal in float16;
4. the inverse (X^T X + lambda_TRAK I)^{-1} in float32, divided by c, the mean absolute value
   of its entries, and rounded to float16;
5. the "features" Phi M, M the rescaled float16 inverse, as float16 matmuls (blocks of 20 000
   rows), and the scores (Phi M) Q^T (Q the query features) in float16, kept in traker's float32
   accumulator (its final float16 store of them is then lossless).

The result is traker's score matrix (transposed to (Q, N)) times c, so that every precision has
the convention above; multiplying by c is the only step added (exact in float64, one rounding
to float32). Nothing is stabilised: X^T X entries above 65504 become inf, entries below ~6e-8
and small dampings become 0, a nearly singular float32 inverse can overflow, and the scores
then hold inf or NaN exactly as traker's would. Where traker would raise (an exactly singular
X^T X + lambda_TRAK I in float16, e.g. a damping that rounds to 0 with N < k) the scores are
NaN instead, so a damping sweep never crashes on one bad damping. The one error kept is the
input check: features that do not fit in float16 at all raise :class:`FloatingPointError`
(traker would store them as inf). float16 results also depend on the absolute scale of the
features (ours are 1/sqrt(k) scaled gradients of lbar; traker divides its projected gradients by
sqrt(#params)) and on the backend's float16 GEMM (this runs on the features' device).

Where the rest lives
--------------------
The seeded random projection R and the streaming of per-example gradients through it are
:mod:`diffusion_attribution.attribution.projection` (:class:`~.projection.Projector`,
:func:`~.projection.featurize`); the similarity baselines are
:mod:`diffusion_attribution.attribution.similarity`. Every baseline matrix of one model -- TRAK,
D-TRAK and the similarity baselines, keyed by
:class:`~diffusion_attribution.attribution.scores.ScoreKey` -- comes from
:func:`diffusion_attribution.attribution.baselines.baseline_scores`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_attribution.attribution.influence import train_gradient_scale
from diffusion_attribution.attribution.projection import PROJECT_BYTES, Projector, featurize
from diffusion_attribution.diffusion.measurements import Measurement

__all__ = [
    "CURVATURE",
    "TRAIN_MEASUREMENTS",
    "mean_eigenvalue",
    "train_features",
    "trak_lambda",
    "trak_scores",
    "trak_scores_sweep",
    "trak_scores_sweeps",
]

Precision = Literal["float16", "float32", "float64"]

#: The curvature of TRAK / D-TRAK in a :class:`~diffusion_attribution.attribution.scores.ScoreKey`: the
#: empirical Fisher GGN^loss of eq. 11 in the projected space (module docstring).
CURVATURE = "projected_empirical"


# --------------------------------------------------------------------------------------
# Scores from projected features
# --------------------------------------------------------------------------------------


def trak_lambda(damping: float, num_train: int) -> float:
    """TRAK's unnormalised damping (added to Phi^T Phi) for our ``damping`` (added to F):
    N * lambda. Equal scores need the same features (ours: 1/sqrt(k) scaled, of lbar)."""
    return float(damping) * int(num_train)


def mean_eigenvalue(train_features: Tensor) -> float:
    """trace(F) / k with F = Phi^T Phi / N: a scale to express damping relative to."""
    phi = train_features.double()
    return float(phi.pow(2).sum() / (phi.shape[0] * phi.shape[1]))


def _prepare(x: Tensor, precision: Precision, what: str) -> Tensor:
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {tuple(x.shape)}")
    if precision == "float16":
        y = x.to(torch.float16)
        if not torch.isfinite(y).all():
            big = float(x.abs().max())
            raise FloatingPointError(
                f"{what} overflow float16 (max |entry| {big:.3g} > 65504); rescale or use float32"
            )
        return y  # stays float16: traker's pipeline (_traker_*) computes in it
    if precision == "float32":
        return x.float().double()
    if precision == "float64":
        return x.double()
    raise ValueError(f"unknown precision {precision!r}; expected 'float16', 'float32' or 'float64'")


def _inputs(query_features, train_features, num_train, precision):
    q = _prepare(query_features, precision, "query_features")
    phi = _prepare(train_features, precision, "train_features")
    if q.shape[1] != phi.shape[1]:
        raise ValueError(f"feature dims differ: {q.shape[1]} vs {phi.shape[1]}")
    n = phi.shape[0] if num_train is None else int(num_train)
    if n != phi.shape[0]:
        raise ValueError(
            f"num_train={n} but train_features has {phi.shape[0]} rows: F is formed from all of them"
        )
    return q, phi, n


def _check_damping(damping: float) -> float:
    damping = float(damping)
    if not damping > 0:
        # lambda = 0 inverts a singular F whenever N < k (traker's default lambda_reg = 0)
        raise ValueError(f"damping must be > 0, got {damping}")
    return damping


#: Rows per block of traker's BasicScoreComputer matmuls (its ``CUDA_MAX_DIM_SIZE`` default).
#: Only X^T X depends on it in float16 (the blocks' products are summed in float16).
TRAKER_BLOCK_ROWS = 20_000


def _traker_xtx(phi: Tensor) -> Tensor:
    """X^T X in the features' dtype: each block's float16 product added to a float16 sum."""
    k = phi.shape[1]
    xtx = torch.zeros(k, k, dtype=phi.dtype, device=phi.device)
    for block in torch.split(phi, TRAKER_BLOCK_ROWS):
        xtx += block.T @ block
    return xtx


def _traker_features(phi: Tensor, xtx: Tensor, lambda_reg: float) -> tuple[Tensor, Tensor]:
    """traker's finalised features Phi M, M = c^{-1} (X^T X + lambda_reg I)^{-1} in Phi's
    dtype, and c (float32, the mean |entry| of the float32 inverse). The damping is added in
    X^T X's dtype; the inverse is float32. An exactly singular matrix (where traker raises)
    gives an all-NaN M."""
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    reg = xtx + lambda_reg * eye  # the damping rounded to float16 and added in float16
    inv, info = torch.linalg.inv_ex(reg.to(torch.float32))  # same LU solve as linalg.inv
    if int(info) != 0:
        inv = torch.full_like(inv, float("nan"))
    c = inv.abs().mean()
    m = (inv / c).to(phi.dtype)
    return torch.cat([block @ m for block in torch.split(phi, TRAKER_BLOCK_ROWS)]), c


def _traker_scores(features: Tensor, query: Tensor, c: Tensor) -> Tensor:
    """(Q, N) float32: traker's float16 product features @ query^T (read into its float32
    accumulator), times c to undo its rescaling of the inverse (exact in float64)."""
    raw = (features @ query.T).to(torch.float32)  # (N, Q), as traker's get_scores
    return (raw.double() * c.double()).to(torch.float32).T.contiguous()


def _traker_sweep(
    queries: Sequence[Tensor], phi: Tensor, dampings: Sequence[float], n: int
) -> list[dict[float, Tensor]]:
    """traker's float16 pipeline for every damping, X^T X and the features Phi M shared by
    all query sets: one {damping: (Q, N)} per query set."""
    xtx = _traker_xtx(phi)
    out: list[dict[float, Tensor]] = [{} for _ in queries]
    for d in dampings:
        features, c = _traker_features(phi, xtx, trak_lambda(d, n))
        for res, q in zip(out, queries, strict=True):
            res[d] = _traker_scores(features, q, c)
    return out


def trak_scores(
    query_features: Tensor,
    train_features: Tensor,
    damping: float,
    num_train: int | None = None,
    precision: Precision = "float32",
) -> Tensor:
    """(1/N) phi_q^T (Phi^T Phi / N + damping I)^{-1} phi_j for all pairs: (Q, N) float32.

    The module docstring's convention. ``"float32"`` / ``"float64"``: the features are
    rounded to ``precision``, then the solve is a Cholesky factorisation in float64 of the
    smaller of F (k x k) and the Gram matrix Phi Phi^T / N (N x N), which give the same scores
    (push-through identity (Phi^T Phi / N + l I)^{-1} Phi^T = Phi^T (Phi Phi^T / N + l I)^{-1}).
    ``"float16"``: traker's float16 BasicScoreComputer pipeline (module docstring, "Precision";
    the cause of the paper's Fig. 18), whose scores may be inf or NaN.
    """
    damping = _check_damping(damping)
    q, phi, n = _inputs(query_features, train_features, num_train, precision)
    if precision == "float16":
        return _traker_sweep([q], phi, [damping], n)[0][damping]
    eye_n = torch.eye(min(phi.shape), dtype=torch.float64, device=phi.device)
    if phi.shape[0] <= phi.shape[1]:
        chol = torch.linalg.cholesky(phi @ phi.T / n + damping * eye_n)
        z = torch.cholesky_solve(phi @ q.T, chol)  # (N, Q)
        scores = z.T / n
    else:
        chol = torch.linalg.cholesky(phi.T @ phi / n + damping * eye_n)
        z = torch.cholesky_solve(q.T, chol)  # (k, Q)
        scores = (phi @ z).T / n
    return scores.float()


def trak_scores_sweep(
    query_features: Tensor,
    train_features: Tensor,
    dampings: Iterable[float],
    num_train: int | None = None,
    precision: Precision = "float32",
) -> dict[float, Tensor]:
    """:func:`trak_scores` for every damping, {damping: (Q, N)}: from one eigendecomposition
    in float32 / float64, from one X^T X and one float16 pipeline per damping in float16."""
    dampings = [_check_damping(d) for d in dampings]
    q, phi, n = _inputs(query_features, train_features, num_train, precision)
    if precision == "float16":
        return _traker_sweep([q], phi, dampings, n)[0]
    if phi.shape[0] <= phi.shape[1]:
        s, u = torch.linalg.eigh(phi @ phi.T / n)
        left, right = (q @ phi.T) @ u, u.T
    else:
        s, v = torch.linalg.eigh(phi.T @ phi / n)
        left, right = q @ v, (phi @ v).T
    s = s.clamp(min=0)
    return {d: ((left / (s + d)) @ right / n).float() for d in dampings}


def trak_scores_sweeps(
    queries: Sequence[Tensor],
    train: Tensor,
    dampings: Sequence[float],
    num_train: int,
    precision: Precision,
) -> list[dict[float, Tensor]]:
    """:func:`trak_scores_sweep` of several query sets against one training set; in float16
    they share X^T X and the features Phi M (traker finalises features once per model)."""
    if precision != "float16":
        return [trak_scores_sweep(q, train, dampings, num_train, precision) for q in queries]
    dampings = [_check_damping(d) for d in dampings]
    prepared = [_inputs(q, train, num_train, precision) for q in queries]
    if not prepared:
        return []
    _, phi, n = prepared[0]
    return _traker_sweep([q for q, _, _ in prepared], phi, dampings, n)


# --------------------------------------------------------------------------------------
# Training features: TRAK (loss) or D-TRAK (square norm)
# --------------------------------------------------------------------------------------

#: The measurement whose gradients form each method's training features (and hence its F).
TRAIN_MEASUREMENTS = {"trak": "loss", "d-trak": "square_norm"}


def train_features(
    model: nn.Module,
    params: Sequence[Tensor],
    measurement: Measurement,
    train_images: Tensor,
    projector: Projector,
    *,
    train_draws: int,
    seed: int,
    batch_size: int = 16,
    project_rows: int | None = None,
    timings: dict[str, float] | None = None,
    progress: bool = False,
    first_id: int = 0,
    labels: Tensor | None = None,
) -> Tensor:
    """Projected gradients (N, k) of ``measurement`` scaled to lbar = l / D (the training side
    of TRAK / D-TRAK), with draws made group by group so memory does not grow with N; on the
    device of ``params`` (:func:`featurize`). ``train_images`` are the examples with ids
    ``first_id, first_id + 1, ...`` of the training set (a shard of it,
    :func:`diffusion_attribution.pipeline.shards.features.sharded_train_features`): draws depend
    only on (seed, example id), so a shard's rows are those of the whole set's. ``labels``
    (N,): the classes of ``train_images``, for a class-conditional model."""
    n = len(train_images)
    scale = train_gradient_scale(train_images[0].numel())
    num_params = sum(p.numel() for p in params)
    group = project_rows or max(batch_size, PROJECT_BYTES // (4 * num_params))
    tf = torch.empty(n, projector.dim, device=params[0].device)
    shown = time.perf_counter()  # progress lines at most every 5 s, and at the end
    for start in range(0, n, group):
        stop = min(start + group, n)
        ids = torch.arange(first_id + start, first_id + stop)
        x = train_images[start:stop]
        d = measurement.draw(x, ids, train_draws, seed)
        tf[start:stop] = featurize(
            model,
            params,
            measurement,
            x,
            d,
            projector,
            batch_size=batch_size,
            scale=scale,
            project_rows=project_rows,
            timings=timings,
            labels=None if labels is None else labels[start:stop],
        )
        if progress and (stop == n or time.perf_counter() - shown >= 5.0):
            print(f"{measurement.name} features: {stop}/{n}", flush=True)
            shown = time.perf_counter()
    return tf
