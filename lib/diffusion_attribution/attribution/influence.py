"""Influence scores (paper eq. 6) with query batching and compressed queries (Sec. 3.2).

Score convention (the one place it is stated; nothing downstream flips signs)
-----------------------------------------------------------------------------
For a measurement m (loss, ELBO, ...) of a query x_q and a training example x_j,

    score[q, j] = (1 / N) * grad m(theta, x_q)^T (K + lambda I)^{-1} grad lbar(theta, x_j),

where N is the number of training examples, lbar = l / D is the training loss of eq. 2 averaged
(not summed) over the D pixels, K is the curvature (a GGN approximation) of the training
objective in the same per-pixel-mean normalisation (what curvlinops' ``MSELoss(reduction=
"mean")`` K-FAC fits; see :mod:`diffusion_attribution.curvature.kfac`) and lambda is the damping.
Since grad^2 L_D = D K for L_D of eq. 3, this is exactly eq. 6 with epsilon = 1/N:

    score[q, j] ~ m(theta_{-j}, x_q) - m(theta, x_q),

the change of the measurement when example j is removed from the training set, and removing a
set S of examples changes m by about sum_{j in S} score[q, j]. A positive score means that
removing x_j would increase m (for the loss: x_j helped the model fit x_q).

Query batching: the query gradients are preconditioned once, (K + lambda I)^{-1} grad m, stored
compressed (int8 by default, App. C), and every training gradient is computed once and used
for all queries and all measurements in one pass (:func:`influence_scores`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_attribution.attribution.compression import Quantized, quantize, svd_compress
from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet
from diffusion_attribution.core.operators import InverseCurvature
from diffusion_attribution.diffusion.gradients import gradient_matrix, per_example_gradients
from diffusion_attribution.diffusion.measurements import Measurement

Compression = Literal["none", "int8", "int4"]


def train_gradient_scale(num_pixels: int) -> float:
    """Factor turning gradients of l (eq. 2, summed over pixels) into gradients of lbar = l / D."""
    return 1.0 / num_pixels


def compress(
    preconditioned: Tensor, compression: str, shapes: Sequence[torch.Size]
) -> Tensor | Quantized:
    """Compress preconditioned query gradients (Q, P): ``"none"`` (float32), ``"int8"`` /
    ``"int4"`` (per-(row, parameter tensor) quantisation) or ``"svd<r>"`` (rank r per layer,
    returned reconstructed, for the ablation of Fig. 6)."""
    pre = preconditioned.float()
    if compression == "none":
        return pre
    if compression in ("int8", "int4"):
        return quantize(pre, 8 if compression == "int8" else 4, [math.prod(s) for s in shapes])
    if compression.startswith("svd") and compression[3:].isdigit():
        return svd_compress(pre, shapes, int(compression[3:]))
    raise ValueError(
        f"unknown compression {compression!r}; expected 'none', 'int8', 'int4' or 'svd<r>'"
    )


def precondition(
    curvature: InverseCurvature,
    query_gradients: Tensor,
    damping: float,
    compression: str = "int8",
    shapes: Sequence[torch.Size] | None = None,
) -> Tensor | Quantized:
    """(K + damping I)^{-1} grad m for each row of ``query_gradients`` (Q, P), then compressed.

    ``shapes`` (of the parameter tensors, default: one block) give each layer its own
    quantisation scale.
    """
    shapes = shapes if shapes is not None else [torch.Size([query_gradients.shape[-1]])]
    pre = curvature.inverse_apply(query_gradients, damping)
    _check_finite(pre, damping)
    return compress(pre, compression, shapes)


def _check_finite(pre: Tensor, damping: float) -> None:
    if not torch.isfinite(pre).all():
        raise FloatingPointError(
            f"preconditioned query gradients are not finite at damping {damping:g}"
        )


def _rows(q: Tensor | Quantized) -> int:
    return q.shape[0]


def _dense(q: Tensor | Quantized, rows: slice) -> Tensor:
    return q.dequantize(rows) if isinstance(q, Quantized) else q[rows].float()


def influence_scores(
    queries: Mapping[object, Tensor | Quantized],
    train_gradients: Iterable[tuple[slice, Tensor]],
    num_train: int,
    *,
    columns: range | None = None,
    query_chunk: int = 256,
    train_chunk_bytes: int = 256 * 2**20,
) -> dict[object, Tensor]:
    """Scores (Q, N) for every named set of preconditioned queries, in one pass over the train set.

    ``train_gradients`` yields (training ids, (b, P) gradients of lbar) batch by batch, e.g.
    :func:`diffusion_attribution.diffusion.gradients.per_example_gradients` with
    ``scale=train_gradient_scale(D)``. Batches are gathered up to ``train_chunk_bytes`` of
    float32 gradients, used for every query set (each dequantised ``query_chunk`` rows at a
    time, so dequantisation is paid once per chunk, not per batch) and then dropped: memory
    holds one chunk of training gradients, one chunk of dequantised queries and the scores.

    ``columns`` (default ``range(num_train)``) is the block of training ids this call scores
    (a shard of the training set): the result has ``len(columns)`` columns, still divided by
    the whole set's ``num_train`` (the 1/N of the score convention). Scores are accumulated
    on the device of the gradients and returned on the CPU.
    """
    columns = range(num_train) if columns is None else columns
    if columns.step != 1 or columns.start < 0 or columns.stop > num_train:
        raise ValueError(f"columns must be a contiguous block of range({num_train}), got {columns}")
    width = len(columns)
    scores: dict[object, Tensor] = {}
    seen = torch.zeros(width, dtype=torch.bool)
    buffer: list[tuple[Tensor, Tensor]] = []

    def flush() -> None:
        ids = torch.cat([i for i, _ in buffer])
        g = torch.cat([x for _, x in buffer]).float()
        buffer.clear()
        for name, q in queries.items():
            out = scores.setdefault(name, torch.zeros(_rows(q), width, device=g.device))
            for start in range(0, _rows(q), query_chunk):
                rows = slice(start, min(start + query_chunk, _rows(q)))
                out[rows, ids.to(g.device)] = _dense(q, rows).to(g.device) @ g.T
        seen[ids] = True

    buffered = 0
    for ids, grads in train_gradients:
        local = torch.arange(num_train)[ids] - columns.start
        if len(local) and (local.min() < 0 or local.max() >= width):
            raise ValueError(f"training ids {ids} lie outside the columns {columns}")
        buffer.append((local, grads))
        buffered += grads.numel() * 4
        if buffered >= train_chunk_bytes:
            flush()
            buffered = 0
    if buffer:
        flush()
    if not seen.all():
        raise ValueError(f"training gradients covered {int(seen.sum())} of {width} examples")
    return {name: (s / num_train).cpu() for name, s in scores.items()}


@dataclass
class Timings:
    """Seconds spent in each part of :func:`attribute` (for the overhead report)."""

    query_gradients: float = 0.0
    train_gradients: float = 0.0
    precondition: float = 0.0
    scoring: float = 0.0

    @property
    def gradients(self) -> float:
        return self.query_gradients + self.train_gradients

    @property
    def overhead(self) -> float:
        """Everything beyond the per-example gradient passes, relative to them."""
        return (self.precondition + self.scoring) / self.gradients


def _timed(
    stream: Iterable[tuple[slice, Tensor]], timings: Timings
) -> Iterator[tuple[slice, Tensor]]:
    """Yield from ``stream``, adding the time spent producing each item to ``train_gradients``."""
    it = iter(stream)
    while True:
        start = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        timings.train_gradients += time.perf_counter() - start
        yield item


def _check_specs(specs, curvatures, measurements) -> None:
    not_kfac = sorted({s.method for s in specs} - {"kfac"})
    if not_kfac:
        raise ValueError(f"attribute computes K-FAC influence only, got methods {not_kfac}")
    unknown = {s.curvature for s in specs} - set(curvatures)
    if unknown:
        raise ValueError(f"no curvature fitted for variants {sorted(unknown)}")
    missing = {s.measurement for s in specs} - set(measurements)
    if missing:
        raise ValueError(f"no measurement named {sorted(missing)}")


def precondition_queries(
    model: nn.Module,
    params: Sequence[Tensor],
    queries: Tensor,
    measurements: Mapping[str, Measurement],
    curvatures: Mapping[str, InverseCurvature],
    specs: Sequence[ScoreKey],
    *,
    query_draws: int,
    seed: int,
    query_ids: Tensor | None = None,
    query_trajectories: Tensor | None = None,
    batch_size: int = 16,
    draw_chunk: int | None = 64,
    progress: bool = False,
    timings: Timings | None = None,
    query_labels: Tensor | None = None,
) -> dict[ScoreKey, Tensor | Quantized]:
    """The query side of :func:`attribute`: for each spec, ``(K + damping I)^{-1} grad m`` of
    every query row, compressed as the spec says (rows on the model's device).

    For each measurement named in ``specs`` the per-example gradients of the queries
    (``query_draws`` draws each, seed ``seed + 1``, drawn by query id: ``query_ids``, default
    ``0..Q-1``, so a block of queries gets the same draws as in the whole set) are computed
    once, then preconditioned by every requested curvature and damping (one rotation into
    each eigenbasis for all dampings of a variant) and compressed. ``query_labels`` (Q,): the
    queries' classes, for a class-conditional model (each query's measurement is taken given
    its class).
    """
    _check_specs(specs, curvatures, measurements)
    timings = Timings() if timings is None else timings
    shapes = [p.shape for p in params]
    q_ids = torch.arange(len(queries)) if query_ids is None else query_ids
    pre: dict[ScoreKey, Tensor | Quantized] = {}
    for name in dict.fromkeys(s.measurement for s in specs):
        m = measurements[name]
        start = time.perf_counter()
        draws = m.draw(queries, q_ids, query_draws, seed + 1, trajectories=query_trajectories)
        grads = gradient_matrix(
            model, params, m, queries, draws, batch_size=batch_size, draw_chunk=draw_chunk,
            labels=query_labels,
        )  # fmt: skip
        if progress:
            print(f"query gradients of {name}: {time.perf_counter() - start:.1f} s", flush=True)
        timings.query_gradients += time.perf_counter() - start
        start = time.perf_counter()
        mine = [s for s in specs if s.measurement == name]
        for variant in dict.fromkeys(s.curvature for s in mine):
            dampings = [s.damping for s in mine if s.curvature == variant]
            solved = curvatures[variant].inverse_apply_sweep(grads, dampings)
            for spec in (s for s in mine if s.curvature == variant):
                _check_finite(solved[spec.damping], spec.damping)
                pre[spec] = compress(solved[spec.damping], spec.compression, shapes)
            del solved
        timings.precondition += time.perf_counter() - start
        del grads
    return pre


def score_columns(
    model: nn.Module,
    params: Sequence[Tensor],
    train_images: Tensor,
    preconditioned: Mapping[ScoreKey, Tensor | Quantized],
    *,
    train_measurement: Measurement,
    train_draws: int,
    seed: int,
    columns: range | None = None,
    batch_size: int = 16,
    draw_chunk: int | None = 64,
    progress: bool = False,
    timings: Timings | None = None,
    train_labels: Tensor | None = None,
) -> dict[ScoreKey, Tensor]:
    """The training side of :func:`attribute`: score columns ``columns`` (default: all) of
    every preconditioned query set, ``(Q, len(columns))`` each.

    The gradients of ``train_measurement`` (the training loss, scaled to lbar = l / D;
    ``train_draws`` draws each, seed ``seed``) are streamed once for all query sets. Draws
    depend only on (seed, training id), so the columns of a shard equal those columns of the
    whole matrix (up to float round-off of batching): shards computed in separate jobs and
    concatenated give :func:`attribute`'s scores. ``train_labels`` (N,): the classes of
    ``train_images``, for a class-conditional model.
    """
    from tqdm.std import tqdm  # only for a progress bar: keeps importing the package cheap

    timings = Timings() if timings is None else timings
    n = len(train_images)
    columns = range(n) if columns is None else columns
    scale = train_gradient_scale(train_images[0].numel())

    def train_stream() -> Iterator[tuple[slice, Tensor]]:
        # draws made batch by batch (they depend only on (seed, index)), so memory is bounded
        # by the batch, not by N
        starts = range(columns.start, columns.stop, batch_size)
        for start in tqdm(starts, desc="train gradients", disable=not progress, mininterval=5):
            ids = torch.arange(start, min(start + batch_size, columns.stop))
            x = train_images[ids]
            draws = train_measurement.draw(x, ids, train_draws, seed)
            for sl, g in per_example_gradients(
                model,
                params,
                train_measurement,
                x,
                draws,
                batch_size=batch_size,
                draw_chunk=draw_chunk,
                scale=scale,
                labels=None if train_labels is None else train_labels[ids],
            ):
                yield slice(start + sl.start, start + sl.stop), g

    start = time.perf_counter()
    before = timings.train_gradients
    scores = influence_scores(preconditioned, _timed(train_stream(), timings), n, columns=columns)
    timings.scoring += time.perf_counter() - start - (timings.train_gradients - before)
    return scores


def attribute(
    model: nn.Module,
    params: Sequence[Tensor],
    train_images: Tensor,
    queries: Tensor,
    measurements: Mapping[str, Measurement],
    curvatures: Mapping[str, InverseCurvature],
    specs: Sequence[ScoreKey],
    *,
    train_measurement: Measurement,
    train_draws: int,
    query_draws: int,
    seed: int,
    query_trajectories: Tensor | None = None,
    batch_size: int = 16,
    draw_chunk: int | None = 64,
    progress: bool = False,
) -> tuple[ScoreSet, Timings]:
    """Score matrices (Q, N) for all ``specs`` (K-FAC keys: ``method="kfac"``, ``curvature`` a
    key of ``curvatures``) in one pass, as a :class:`~diffusion_attribution.attribution.scores.ScoreSet`.

    :func:`precondition_queries` (query side: gradients of the ``Q`` queries, ``query_draws``
    draws each, seed ``seed + 1``, preconditioned by every curvature / damping and
    compressed), then :func:`score_columns` (train side: gradients of ``train_measurement``,
    ``train_draws`` draws each, seed ``seed``, streamed once for all of them). Memory is
    bounded by ``batch_size`` examples x ``draw_chunk`` draws per forward pass. For work
    split over jobs (shards of the training set, blocks of queries) see
    :mod:`diffusion_attribution.pipeline.shards.influence`.
    """
    _check_specs(specs, curvatures, measurements)
    timings = Timings()
    pre = precondition_queries(
        model,
        params,
        queries,
        measurements,
        curvatures,
        specs,
        query_draws=query_draws,
        seed=seed,
        query_trajectories=query_trajectories,
        batch_size=batch_size,
        draw_chunk=draw_chunk,
        progress=progress,
        timings=timings,
    )
    scores = score_columns(
        model,
        params,
        train_images,
        pre,
        train_measurement=train_measurement,
        train_draws=train_draws,
        seed=seed,
        batch_size=batch_size,
        draw_chunk=draw_chunk,
        progress=progress,
        timings=timings,
    )
    return ScoreSet(scores), timings


def influence_specs(
    variants: Sequence[str],
    measurements: Sequence[str],
    damping: float,
    compression: str,
    damping_sweep: Sequence[float] = (),
    sweep_measurements: Sequence[str] = ("loss", "elbo"),
    compression_ablation: Sequence[str] = (),
    reference_variant: str = "mc_expand",
    ablation_measurements: Sequence[str] | None = None,
) -> list[ScoreKey]:
    """The K-FAC score matrices of the influence stage, without duplicates.

    ``reference_variant`` (the paper's method) for every measurement and the other variants
    for ``ablation_measurements`` (default: all), at the default damping and compression (the
    Hessian ablation of Fig. 4); the damping sweep of Figs. 4 and 7 for every variant on
    ``sweep_measurements`` (the other variants only on the ablation measurements); and, for
    Fig. 6, ``reference_variant`` on the loss with each compression in ``compression_ablation``
    (``"none"``, ``"int4"``, ``"svd<r>"``), with every variant uncompressed as well when
    ``"none"`` is among them (the compression's check for each variant).
    """
    ablation = list(measurements) if ablation_measurements is None else list(ablation_measurements)
    unknown = set(ablation) - set(measurements)
    if unknown:
        raise ValueError(
            f"ablation measurements {sorted(unknown)} are not among {list(measurements)}"
        )

    def key(variant: str, measurement: str, d: float, c: str) -> ScoreKey:
        return ScoreKey("kfac", measurement, curvature=variant, damping=d, compression=c)

    specs = [
        key(v, m, damping, compression)
        for v in variants
        for m in measurements
        if v == reference_variant or m in ablation
    ]
    specs += [
        key(v, m, d, compression)
        for v in variants
        for d in damping_sweep
        for m in sweep_measurements
        if m in measurements and (v == reference_variant or m in ablation)
    ]
    if "loss" in measurements:
        # every variant uncompressed too, so that the compression is validated for each
        specs += [
            key(v, "loss", damping, "none") for v in variants if "none" in compression_ablation
        ]
        if reference_variant in variants:
            specs += [key(reference_variant, "loss", damping, c) for c in compression_ablation]
    return list(dict.fromkeys(specs))
