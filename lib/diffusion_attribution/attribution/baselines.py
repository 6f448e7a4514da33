"""Every baseline score matrix of one model: TRAK, D-TRAK and the similarity baselines (Sec. 4).

:func:`baseline_scores` is the ``baselines`` stage's one library call. It computes the projected
training features of each method once
(:func:`~diffusion_attribution.attribution.trak.train_features`), the projected query features
once per measurement, and scores them with TRAK / D-TRAK
(:mod:`diffusion_attribution.attribution.trak`, every damping and precision) and with the
similarity baselines (:mod:`diffusion_attribution.attribution.similarity`), all keyed by
:class:`~diffusion_attribution.attribution.scores.ScoreKey` in the score convention of
:mod:`diffusion_attribution.attribution.influence`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from diffusion_attribution.attribution.projection import Projector, featurize
from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet
from diffusion_attribution.attribution.similarity import (
    bottleneck_features,
    feature_cosine,
    gradient_cosine,
    gradient_dot,
    pixel_similarity,
)
from diffusion_attribution.attribution.trak import (
    CURVATURE,
    TRAIN_MEASUREMENTS,
    Precision,
    mean_eigenvalue,
    train_features,
    trak_scores_sweeps,
)
from diffusion_attribution.core.devices import synchronize
from diffusion_attribution.diffusion.measurements import Measurement

__all__ = ["baseline_scores"]


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
    query_trajectories: Tensor | Mapping[str, Tensor] | None = None,
    feature_module: str | None = "mid2",
    batch_size: int = 16,
    project_rows: int | None = None,
    progress: bool = False,
    train: Mapping[str, Tensor] | None = None,
) -> ScoreSet:
    """TRAK, D-TRAK and similarity scores (Q, N) of one model, keyed by
    :class:`~diffusion_attribution.attribution.scores.ScoreKey`.

    ``measurements`` maps names to measurements (as in
    :func:`~diffusion_attribution.attribution.influence.attribute`); it must hold ``"loss"``,
    ``"square_norm"`` and every name in ``query_measurements``. Training features
    (:func:`~diffusion_attribution.attribution.trak.train_features`) are computed once per
    method -- gradients of ``TRAIN_MEASUREMENTS[method]`` (the loss for TRAK, the square norm
    for D-TRAK) scaled to lbar = l / D, ``train_draws`` draws each with seed ``seed`` -- and
    query features once per measurement (unscaled, ``query_draws`` draws with seed ``seed + 1``,
    ``query_trajectories`` for a measurement that needs them: one tensor for all, or a mapping
    from measurement name to its tensor, e.g. ``{"trajectory": x_t trajectories, "journey":
    predicted-x_0 trajectories}``), then scored for every damping and precision:

    - ``ScoreKey("trak", m, curvature="projected_empirical", damping=d, compression="none",
      precision=p)`` for m in ``query_measurements`` and p in ``precisions``,
    - ``ScoreKey("d-trak", "square_norm", curvature="projected_empirical", damping=d,
      precision=p)`` (D-TRAK's query gradients are of the square norm too),
    - ``ScoreKey("grad_dot" | "grad_cos", m)`` on the projected query features of m and the
      projected loss features (the identity in place of the Hessian; curvature ``"none"``,
      damping 0, float32), ``ScoreKey("pixel", "none")`` and, unless ``feature_module`` is
      None, ``ScoreKey("feature_cos", "none")``: the cosine of the model's features at that
      submodule (:func:`~diffusion_attribution.attribution.similarity.bottleneck_features`).
    - Journey-TRAK is TRAK with the query measurement ``"journey"``
      (:class:`~diffusion_attribution.diffusion.measurements.JourneyLoss`): ``ScoreKey("trak",
      "journey", ...)`` when ``query_measurements`` holds it.

    Dampings d are ``relative_dampings`` times the mean eigenvalue trace(F)/k of each method's
    projected empirical Fisher F = Phi^T Phi / N
    (:func:`~diffusion_attribution.attribution.trak.mean_eigenvalue`; the absolute value,
    normalised by N as in App. G.3.1, is the key's ``damping``). ``batch_size`` and
    ``project_rows`` are passed to :func:`~diffusion_attribution.attribution.projection.featurize`
    (speed and memory only). float16 scores are traker's float16 pipeline
    (:mod:`diffusion_attribution.attribution.trak`, "Precision") and may hold inf or NaN.

    Every feature, kernel and score is computed on the device of ``params`` (the model's: the
    sketch is generated there too, :class:`~diffusion_attribution.attribution.projection.Projector`),
    and the matrices stay there; the caller moves them (to the CPU) when it saves them.

    ``train`` (method -> (N, k) features, e.g. from
    :func:`diffusion_attribution.pipeline.shards.features.sharded_train_features`) skips the
    training features' computation; they must be what
    :func:`~diffusion_attribution.attribution.trak.train_features` gives for these arguments.

    Returns a :class:`~diffusion_attribution.attribution.scores.ScoreSet` with
    ``meta = {"mean_eigenvalue": {"trak": ..., "d-trak": ...}, "seconds": {"gradients": ...,
    "projection": ..., "scoring": ...}}``.
    """
    needed = dict.fromkeys([*TRAIN_MEASUREMENTS.values(), *query_measurements])
    missing = [name for name in needed if name not in measurements]
    if missing:
        raise ValueError(f"no measurement named {missing}; have {sorted(measurements)}")
    timings: dict[str, float] = {}
    n = len(train_images)
    device = params[0].device
    if train is None:
        train = {
            method: train_features(
                model,
                params,
                measurements[name],
                train_images,
                projector,
                train_draws=train_draws,
                seed=seed,
                batch_size=batch_size,
                project_rows=project_rows,
                timings=timings,
                progress=progress,
            )
            for method, name in TRAIN_MEASUREMENTS.items()
        }
    else:
        _check_train_features(train, n, projector.dim)
    train = {m: f.to(device) for m, f in train.items()}
    q_ids = torch.arange(len(queries))
    query = {}
    for name in dict.fromkeys([*query_measurements, TRAIN_MEASUREMENTS["d-trak"]]):
        m = measurements[name]
        trajectories = (
            query_trajectories.get(name)
            if isinstance(query_trajectories, Mapping)
            else query_trajectories
        )
        d = m.draw(queries, q_ids, query_draws, seed + 1, trajectories=trajectories)
        kw = dict(batch_size=batch_size, project_rows=project_rows, timings=timings)
        query[name] = featurize(model, params, m, queries, d, projector, **kw)
    start = time.perf_counter()
    eigenvalues = {method: mean_eigenvalue(f) for method, f in train.items()}
    scores = _trak_matrices(
        query, train, eigenvalues, relative_dampings, query_measurements, precisions, n
    )
    scores |= _similarity_matrices(query, train["trak"], queries, train_images, query_measurements)
    if feature_module is not None:
        scores |= _feature_matrix(model, queries, train_images, feature_module)
    synchronize(device)
    timings["scoring"] = time.perf_counter() - start
    return ScoreSet(scores, {"mean_eigenvalue": eigenvalues, "seconds": timings})


def _feature_matrix(
    model: nn.Module, queries: Tensor, train_images: Tensor, module: str
) -> dict[ScoreKey, Tensor]:
    """The cosine of the model's features at ``module`` of the queries and the training images."""
    device = next(model.parameters()).device
    features = bottleneck_features(
        model, torch.cat([queries, train_images]).to(device), module=module
    )
    return {
        ScoreKey("feature_cos", "none"): feature_cosine(
            features[: len(queries)], features[len(queries) :]
        )
    }


def _check_train_features(train: Mapping[str, Tensor], n: int, dim: int) -> None:
    """Given training features must be every method's, (N, k) each."""
    if sorted(train) != sorted(TRAIN_MEASUREMENTS) or any(
        f.shape != (n, dim) for f in train.values()
    ):
        shapes = {m: tuple(f.shape) for m, f in train.items()}
        raise ValueError(
            f"train features must be {sorted(TRAIN_MEASUREMENTS)} of shape {(n, dim)}, got {shapes}"
        )


def _trak_matrices(
    query: Mapping[str, Tensor],
    train: Mapping[str, Tensor],
    eigenvalues: Mapping[str, float],
    relative_dampings: Sequence[float],
    query_measurements: Sequence[str],
    precisions: Sequence[Precision],
    n: int,
) -> dict[ScoreKey, Tensor]:
    """TRAK's matrices for every query measurement and D-TRAK's for the square norm, at each
    damping ``relative_dampings`` times the method's mean eigenvalue and each precision; the
    query sets of one method share a sweep (:func:`~.trak.trak_scores_sweeps`)."""
    jobs = [("trak", m) for m in query_measurements] + [("d-trak", TRAIN_MEASUREMENTS["d-trak"])]
    sweeps: dict[tuple[str, str, str], dict[float, Tensor]] = {}
    for method in TRAIN_MEASUREMENTS:
        names = list(dict.fromkeys(name for m, name in jobs if m == method))
        dampings = [r * eigenvalues[method] for r in relative_dampings]
        for precision in precisions:
            found = trak_scores_sweeps(
                [query[name] for name in names], train[method], dampings, n, precision
            )
            sweeps.update(
                {(method, name, precision): f for name, f in zip(names, found, strict=True)}
            )
    scores: dict[ScoreKey, Tensor] = {}
    for method, name in jobs:
        for precision in precisions:
            for d, s in sweeps[(method, name, precision)].items():
                key = ScoreKey(
                    method,
                    name,
                    curvature=CURVATURE,
                    damping=d,
                    compression="none",
                    precision=precision,
                )
                scores[key] = s
    return scores


def _similarity_matrices(
    query: Mapping[str, Tensor],
    train_loss: Tensor,
    queries: Tensor,
    train_images: Tensor,
    query_measurements: Sequence[str],
) -> dict[ScoreKey, Tensor]:
    """The gradient dot product and cosine of each query measurement's features against the
    projected loss features ``train_loss`` (N, k), then pixel similarity, on their device."""
    n, device = len(train_loss), train_loss.device
    scores: dict[ScoreKey, Tensor] = {}
    for name in query_measurements:
        scores[ScoreKey("grad_dot", name)] = gradient_dot(query[name], train_loss, n)
        scores[ScoreKey("grad_cos", name)] = gradient_cosine(query[name], train_loss)
    scores[ScoreKey("pixel", "none")] = pixel_similarity(
        queries.to(device), train_images.to(device)
    )
    return scores
