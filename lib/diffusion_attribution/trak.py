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

the convention of :mod:`diffusion_attribution.influence` (float32 (Q, N), lbar = l / D,
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
traker also rescales (X^T X + lambda I)^{-1} by its mean absolute entry before going to
float16; that multiplies all scores by one positive constant and is not done here.

Where the rest lives
--------------------
The seeded random projection R and the streaming of per-example gradients through it are
:mod:`diffusion_attribution.projection` (:class:`Projector`, :func:`featurize`); the similarity
baselines scored alongside TRAK by :func:`baseline_scores` are
:mod:`diffusion_attribution.similarity`. Both are re-exported here (``__all__``) so that
``from diffusion_attribution.trak import Projector, featurize, pixel_similarity`` keeps working.
:func:`baseline_scores` is the one orchestrator: every baseline matrix of a model, keyed by
:class:`~diffusion_attribution.scores.ScoreKey`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .measurements import Measurement
from .projection import BLOCK_ROWS, PROJECT_BYTES, Projector, featurize
from .scores import ScoreKey, ScoreSet
from .similarity import gradient_cosine, gradient_dot, pixel_similarity

__all__ = [
    "BLOCK_ROWS",
    "TRAIN_MEASUREMENTS",
    "Projector",
    "baseline_scores",
    "featurize",
    "gradient_cosine",
    "gradient_dot",
    "mean_eigenvalue",
    "pixel_similarity",
    "train_features",
    "trak_lambda",
    "trak_scores",
    "trak_scores_sweep",
]

Precision = Literal["float16", "float32", "float64"]

#: The curvature of TRAK / D-TRAK in a :class:`~diffusion_attribution.scores.ScoreKey`: the
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
        return y.double()
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


def trak_scores(
    query_features: Tensor,
    train_features: Tensor,
    damping: float,
    num_train: int | None = None,
    precision: Precision = "float32",
) -> Tensor:
    """(1/N) phi_q^T (Phi^T Phi / N + damping I)^{-1} phi_j for all pairs: (Q, N) float32.

    The module docstring's convention. The features are first rounded to ``precision``
    (``"float16"`` emulates traker's default storage, the cause of the paper's Fig. 18); the
    solve is a Cholesky factorisation in float64 of the smaller of F (k x k) and the Gram
    matrix Phi Phi^T / N (N x N), which give the same scores (push-through identity
    (Phi^T Phi / N + l I)^{-1} Phi^T = Phi^T (Phi Phi^T / N + l I)^{-1}).
    """
    damping = _check_damping(damping)
    q, phi, n = _inputs(query_features, train_features, num_train, precision)
    eye_n = torch.eye(min(phi.shape), dtype=torch.float64)
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
    """:func:`trak_scores` for every damping, from one eigendecomposition: {damping: (Q, N)}."""
    dampings = [_check_damping(d) for d in dampings]
    q, phi, n = _inputs(query_features, train_features, num_train, precision)
    if phi.shape[0] <= phi.shape[1]:
        s, u = torch.linalg.eigh(phi @ phi.T / n)
        left, right = (q @ phi.T) @ u, u.T
    else:
        s, v = torch.linalg.eigh(phi.T @ phi / n)
        left, right = q @ v, (phi @ v).T
    s = s.clamp(min=0)
    return {d: ((left / (s + d)) @ right / n).float() for d in dampings}


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
) -> Tensor:
    """Projected gradients (N, k) of ``measurement`` scaled to lbar = l / D (the training side
    of TRAK / D-TRAK), with draws made group by group so memory does not grow with N."""
    from .influence import train_gradient_scale

    n = len(train_images)
    scale = train_gradient_scale(train_images[0].numel())
    num_params = sum(p.numel() for p in params)
    group = project_rows or max(batch_size, PROJECT_BYTES // (4 * num_params))
    tf = torch.empty(n, projector.dim)
    for start in range(0, n, group):
        ids = torch.arange(start, min(start + group, n))
        x = train_images[ids]
        d = measurement.draw(x, ids, train_draws, seed)
        tf[ids] = featurize(
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
        )
        if progress:
            print(f"{measurement.name} features: {min(start + group, n)}/{n}", flush=True)
    return tf


# --------------------------------------------------------------------------------------
# The baselines stage: every baseline score matrix of one model
# --------------------------------------------------------------------------------------


def baseline_scores(
    model: nn.Module,
    params: Sequence[Tensor],
    train_images: Tensor,
    queries: Tensor,
    measurements: Mapping[str, Measurement],
    projector: Projector,
    relative_dampings: Sequence[float],
    *,
    query_measurements: Sequence[str],
    train_draws: int,
    query_draws: int,
    seed: int,
    precisions: Sequence[Precision] = ("float32", "float16"),
    query_trajectories: Tensor | None = None,
    batch_size: int = 16,
    project_rows: int | None = None,
    progress: bool = False,
) -> ScoreSet:
    """TRAK, D-TRAK and similarity scores (Q, N) of one model, keyed by
    :class:`~diffusion_attribution.scores.ScoreKey`.

    ``measurements`` maps names to measurements (as in
    :func:`~diffusion_attribution.influence.attribute`); it must hold ``"loss"``,
    ``"square_norm"`` and every name in ``query_measurements``. Training features
    (:func:`train_features`) are computed once per method -- gradients of
    ``TRAIN_MEASUREMENTS[method]`` (the loss for TRAK, the square norm for D-TRAK) scaled to
    lbar = l / D, ``train_draws`` draws each with seed ``seed`` -- and query features once per
    measurement (unscaled, ``query_draws`` draws with seed ``seed + 1``, ``query_trajectories``
    for a trajectory measurement), then scored for every damping and precision:

    - ``ScoreKey("trak", m, curvature="projected_empirical", damping=d, compression="none",
      precision=p)`` for m in ``query_measurements`` and p in ``precisions``,
    - ``ScoreKey("d-trak", "square_norm", curvature="projected_empirical", damping=d,
      precision=p)`` (D-TRAK's query gradients are of the square norm too),
    - ``ScoreKey("grad_dot" | "grad_cos", m)`` on the projected query features of m and the
      projected loss features (the identity in place of the Hessian; curvature ``"none"``,
      damping 0, float32), and ``ScoreKey("pixel", "none")``.

    Dampings d are ``relative_dampings`` times the mean eigenvalue trace(F)/k of each method's
    projected empirical Fisher F = Phi^T Phi / N (:func:`mean_eigenvalue`; the absolute value,
    normalised by N as in App. G.3.1, is the key's ``damping``). ``batch_size`` and
    ``project_rows`` are passed to :func:`featurize` (speed and memory only).

    Returns a :class:`~diffusion_attribution.scores.ScoreSet` with
    ``meta = {"mean_eigenvalue": {"trak": ..., "d-trak": ...}, "seconds": {"gradients": ...,
    "projection": ..., "scoring": ...}}``.
    """
    needed = dict.fromkeys([*TRAIN_MEASUREMENTS.values(), *query_measurements])
    missing = [name for name in needed if name not in measurements]
    if missing:
        raise ValueError(f"no measurement named {missing}; have {sorted(measurements)}")
    timings: dict[str, float] = {}
    n = len(train_images)
    kw = dict(
        train_draws=train_draws,
        seed=seed,
        batch_size=batch_size,
        project_rows=project_rows,
        timings=timings,
        progress=progress,
    )
    train = {
        method: train_features(model, params, measurements[name], train_images, projector, **kw)
        for method, name in TRAIN_MEASUREMENTS.items()
    }
    q_ids = torch.arange(len(queries))
    query = {}
    for name in dict.fromkeys([*query_measurements, TRAIN_MEASUREMENTS["d-trak"]]):
        m = measurements[name]
        d = m.draw(queries, q_ids, query_draws, seed + 1, trajectories=query_trajectories)
        query[name] = featurize(
            model,
            params,
            m,
            queries,
            d,
            projector,
            batch_size=batch_size,
            project_rows=project_rows,
            timings=timings,
        )
    start = time.perf_counter()
    eigenvalues = {method: mean_eigenvalue(f) for method, f in train.items()}
    scores: dict[ScoreKey, Tensor] = {}
    jobs = [("trak", m) for m in query_measurements] + [("d-trak", TRAIN_MEASUREMENTS["d-trak"])]
    for method, name in jobs:
        dampings = [r * eigenvalues[method] for r in relative_dampings]
        for precision in precisions:
            sweep = trak_scores_sweep(query[name], train[method], dampings, n, precision)
            for d, s in sweep.items():
                key = ScoreKey(
                    method,
                    name,
                    curvature=CURVATURE,
                    damping=d,
                    compression="none",
                    precision=precision,
                )
                scores[key] = s
    for name in query_measurements:
        scores[ScoreKey("grad_dot", name)] = gradient_dot(query[name], train["trak"], n)
        scores[ScoreKey("grad_cos", name)] = gradient_cosine(query[name], train["trak"])
    scores[ScoreKey("pixel", "none")] = pixel_similarity(queries, train_images)
    timings["scoring"] = time.perf_counter() - start
    return ScoreSet(scores, {"mean_eigenvalue": eigenvalues, "seconds": timings})
