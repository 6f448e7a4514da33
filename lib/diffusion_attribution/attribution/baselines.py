"""Every baseline score matrix of one model: TRAK, D-TRAK, DAS and the similarity baselines (Sec. 4).

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

from diffusion_attribution.attribution import das as das_module
from diffusion_attribution.attribution.das import OUTPUT_MEAN, das_scores_sweep, residual_weights
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

__all__ = ["FEATURE_MEASUREMENTS", "baseline_scores", "feature_methods"]

#: The measurement whose gradients form each projected-feature method's training features:
#: TRAK's and D-TRAK's (:data:`~diffusion_attribution.attribution.trak.TRAIN_MEASUREMENTS`) and
#: DAS's output function (:class:`~diffusion_attribution.attribution.das.OutputMean`).
FEATURE_MEASUREMENTS = {**TRAIN_MEASUREMENTS, "das": OUTPUT_MEAN}


def feature_methods(das: bool) -> tuple[str, ...]:
    """The methods whose training features :func:`baseline_scores` needs (with DAS or not)."""
    return tuple(m for m in FEATURE_MEASUREMENTS if das or m != "das")


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
    das: bool = False,
    query_trajectories: Tensor | Mapping[str, Tensor] | None = None,
    feature_module: str | None = "mid2",
    batch_size: int = 16,
    project_rows: int | None = None,
    progress: bool = False,
    train: Mapping[str, Tensor] | None = None,
    train_labels: Tensor | None = None,
    query_labels: Tensor | None = None,
) -> ScoreSet:
    """TRAK, D-TRAK, DAS and similarity scores (Q, N) of one model, keyed by :class:`ScoreKey`.

    ``measurements`` maps names to measurements (as in
    :func:`~diffusion_attribution.attribution.influence.attribute`); it must hold ``"loss"``,
    ``"square_norm"`` (``"output_mean"`` with ``das``) and every name in
    ``query_measurements``. Training features (:func:`~.trak.train_features`) are computed once
    per method -- gradients of ``FEATURE_MEASUREMENTS[method]`` scaled by 1 / D, ``train_draws``
    draws each with seed ``seed`` -- and query features once per measurement (unscaled,
    ``query_draws`` draws with seed ``seed + 1``, ``query_trajectories`` for a measurement that
    needs them: one tensor for all, or a mapping from measurement name to its tensor, e.g.
    ``{"trajectory": x_t trajectories, "journey": predicted-x_0 trajectories}``), then scored
    for every damping and precision:

    - ``ScoreKey("trak", m, curvature="projected_empirical", damping=d, precision=p)`` for m in
      ``query_measurements`` and p in ``precisions`` (with ``"journey"``: Journey-TRAK),
    - ``ScoreKey("d-trak", "square_norm", ...)`` likewise (its queries: the square norm too),
    - with ``das``, ``ScoreKey("das", "output_mean", curvature="projected_output_ggn",
      damping=d)`` in float32: DAS (:mod:`~diffusion_attribution.attribution.das`), output
      gradients on both sides times each training example's RMS residual at its draws,
    - ``ScoreKey("grad_dot" | "grad_cos", m)`` on the projected query features of m and the
      projected loss features (the identity in place of the Hessian; curvature ``"none"``,
      damping 0, float32), ``ScoreKey("pixel", "none")`` and, unless ``feature_module`` is
      None, ``ScoreKey("feature_cos", "none")``: the cosine of the model's features at that
      submodule (:func:`~diffusion_attribution.attribution.similarity.bottleneck_features`).

    Dampings d are ``relative_dampings`` times the mean eigenvalue trace(F)/k of each method's
    projected curvature F = Phi^T Phi / N
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
    training features' computation; they must be what :func:`~.trak.train_features` gives for
    these arguments. ``train_labels`` (N,), ``query_labels`` (Q,): the classes, if conditional.

    Returns a :class:`~diffusion_attribution.attribution.scores.ScoreSet` with
    ``meta = {"mean_eigenvalue": {"trak": ..., "d-trak": ..., "das": ...}, "seconds": {"gradients": ...,
    "projection": ..., "scoring": ...}}``.
    """
    methods = feature_methods(das)
    needed = dict.fromkeys([*(FEATURE_MEASUREMENTS[m] for m in methods), *query_measurements])
    missing = [name for name in needed if name not in measurements]
    if missing:
        raise ValueError(f"no measurement named {missing}; have {sorted(measurements)}")
    timings: dict[str, float] = {}
    n = len(train_images)
    device = params[0].device
    if train is None:
        kw = dict(batch_size=batch_size, project_rows=project_rows, timings=timings)
        train = {
            method: train_features(
                model, params, measurements[FEATURE_MEASUREMENTS[method]], train_images,
                projector, train_draws=train_draws, seed=seed, progress=progress,
                labels=train_labels, **kw,
            )
            for method in methods
        }  # fmt: skip
    else:
        _check_train_features(train, n, projector.dim, methods)
    train = {m: f.to(device) for m, f in train.items()}
    own = [FEATURE_MEASUREMENTS[m] for m in methods if m != "trak"]  # D-TRAK's, DAS's
    query = {
        name: _query_features(
            model, params, name, measurements[name], queries, projector, query_draws, seed + 1,
            query_trajectories, dict(batch_size=batch_size, project_rows=project_rows,
                                     timings=timings, labels=query_labels),
        )
        for name in dict.fromkeys([*query_measurements, *own])
    }  # fmt: skip
    start = time.perf_counter()
    eigenvalues = {method: mean_eigenvalue(f) for method, f in train.items()}
    scores = _trak_matrices(
        query, train, eigenvalues, relative_dampings, query_measurements, precisions, n
    )
    if das:
        residuals = residual_weights(
            model, measurements["loss"], train_images, draws=train_draws, seed=seed,
            batch_size=batch_size, labels=train_labels,
        )  # fmt: skip
        scores |= _das_matrices(
            query[OUTPUT_MEAN], train["das"], residuals, eigenvalues["das"], relative_dampings
        )
    scores |= _similarity_matrices(query, train["trak"], queries, train_images, query_measurements)
    if feature_module is not None:
        both = None if train_labels is None else torch.cat([query_labels, train_labels])
        scores |= _feature_matrix(model, queries, train_images, feature_module, both)
    synchronize(device)
    timings["scoring"] = time.perf_counter() - start
    return ScoreSet(scores, {"mean_eigenvalue": eigenvalues, "seconds": timings})


def _das_matrices(
    query: Tensor,
    train: Tensor,
    residuals: Tensor,
    eigenvalue: float,
    relative_dampings: Sequence[float],
) -> dict[ScoreKey, Tensor]:
    """DAS's matrices at each damping ``relative_dampings`` times its mean eigenvalue."""
    dampings = [r * eigenvalue for r in relative_dampings]
    found = das_scores_sweep(query, train, residuals, dampings, len(train))
    return {
        ScoreKey("das", OUTPUT_MEAN, curvature=das_module.CURVATURE, damping=d): s
        for d, s in found.items()
    }


def _query_features(
    model: nn.Module,
    params: Sequence[Tensor],
    name: str,
    measurement: Measurement,
    queries: Tensor,
    projector: Projector,
    draws: int,
    seed: int,
    trajectories: Tensor | Mapping[str, Tensor] | None,
    kw: dict,
) -> Tensor:
    """Projected query gradients (Q, k) of the measurement called ``name`` (unscaled), with its
    trajectories when ``trajectories`` maps ``name`` to them (or is one tensor for all)."""
    if isinstance(trajectories, Mapping):
        trajectories = trajectories.get(name)
    ids = torch.arange(len(queries))
    d = measurement.draw(queries, ids, draws, seed, trajectories=trajectories)
    return featurize(model, params, measurement, queries, d, projector, **kw)


def _feature_matrix(
    model: nn.Module, queries: Tensor, train_images: Tensor, module: str, labels: Tensor | None
) -> dict[ScoreKey, Tensor]:
    """The cosine of the model's features at ``module`` of the queries and the training images."""
    device = next(model.parameters()).device
    features = bottleneck_features(
        model, torch.cat([queries, train_images]).to(device), module=module, labels=labels
    )
    return {
        ScoreKey("feature_cos", "none"): feature_cosine(
            features[: len(queries)], features[len(queries) :]
        )
    }


def _check_train_features(
    train: Mapping[str, Tensor], n: int, dim: int, methods: Sequence[str]
) -> None:
    """Given training features must be every method's, (N, k) each."""
    if sorted(train) != sorted(methods) or any(f.shape != (n, dim) for f in train.values()):
        shapes = {m: tuple(f.shape) for m, f in train.items()}
        raise ValueError(
            f"train features must be {sorted(methods)} of shape {(n, dim)}, got {shapes}"
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
