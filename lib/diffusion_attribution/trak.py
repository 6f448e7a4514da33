"""TRAK and D-TRAK for diffusion models, and simple similarity baselines (paper Sec. 3.1, 4).

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

Random projection (:class:`Projector`)
--------------------------------------
phi(g) = g @ R / sqrt(k) with R (P, k) of i.i.d. +-1 (Rademacher) or N(0, 1) entries, so that
E[phi(g)^T phi(h)] = g^T h (Johnson-Lindenstrauss). R is never held whole unless it fits
``cache_bytes``: its rows come in blocks of :data:`BLOCK_ROWS` rows, block b drawn from its own
counter-based generator (Philox-4x64 keyed by the seed, counter (0, b, 0, 0) for +-1; a
torch generator seeded from (seed, b) for Gaussian entries). The sketch is therefore a function
of (seed, k, kind) only: the same whatever the batch of gradients projected at once and
whatever ``chunk`` (rows generated and multiplied per step, a multiple of the block) is used.

Measured design (``benchmarks/bench_trak.py --options``: tiny U-Net, P = 175,569, 357
gradients, 1 torch thread on a busy 2-core AMD EPYC with AVX-512), seconds per 357 rows:

    k      rows/call  +-1 regenerated  +-1 cached  Gaussian regenerated  one +-1 sketch pass
    8192   357        12.8             (5.8 GB)    17.7                  0.48
    8192   32         19.9             (5.8 GB)    81.2
    2048   357        3.2              2.7         4.2                   0.21
    2048   32         6.0              4.5         19.6

The float32 GEMM (b x P x k, ~60-80 GFLOP/s per core) is the floor. +-1 entries from Philox
bits (np.unpackbits, then uint8 -> float32 in ~4 MiB chunks that stay in cache) cost
~3 G entries/s, against ~0.08 G/s for traker's ``bernoulli_`` and ~0.3 G/s for ``normal_``,
which traker's CPU projector redraws for the whole sketch on every call (87 s against our
18 s for the same gradients at k = 8192 in the benchmark). So: chunked regeneration by default;
a cache (only when P * k * 4 bytes fits ``cache_bytes``) saves the generation, 15-35%; more
rows per call help most, hence :func:`featurize` buffers ``project_rows`` gradients.
Rejected: chunks of 512 rows at k = 8192 (16 MiB, out of cache: 31 s instead of 20 s at 32
rows/call); bfloat16 GEMMs (2.4x faster here, but torch has no bf16 x bf16 -> float32 matmul
on CPU, so the projected features would be rounded to 8 mantissa bits).

Similarity baselines
--------------------
:func:`pixel_similarity`, :func:`gradient_dot` and :func:`gradient_cosine` are *not* influence
estimates: they do not predict m(theta_{-j}, x_q) - m(theta, x_q) and have no units of m. They
are context ("does a method beat looking alike?"). They share the (Q, N) float32 format and
the direction of the convention (larger = x_j more "responsible" for x_q, which for the loss
measurement means removing x_j should increase the query's loss), but not its scale.
:func:`gradient_dot` is the first-order score with the identity in place of the Hessian.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from .measurements import Measurement

__all__ = [
    "BLOCK_ROWS",
    "Projector",
    "featurize",
    "gradient_cosine",
    "gradient_dot",
    "mean_eigenvalue",
    "pixel_similarity",
    "trak_attribute",
    "trak_lambda",
    "trak_scores",
    "trak_scores_sweep",
]

Kind = Literal["rademacher", "gaussian", "identity"]
Precision = Literal["float16", "float32", "float64"]

#: Rows of the sketch R drawn from one generator (the unit of the seed schedule).
BLOCK_ROWS = 64
#: Bytes of sketch generated and multiplied per step when ``chunk`` is not given (cache-sized).
CHUNK_BYTES = 4 << 20
#: Default bytes of gradients buffered per projection call in :func:`featurize`.
PROJECT_BYTES = 128 << 20


def _philox_key(seed: int) -> np.ndarray:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.SeedSequence([int(seed), 0x7241]).generate_state(2, dtype=np.uint64)


class Projector:
    """Seeded Johnson-Lindenstrauss projection phi(g) = g @ R / sqrt(dim) (module docstring).

    Args:
        num_params: P, the length of the gradients (flat layout of ``gradients``).
        dim: k, the projected dimension.
        seed: the sketch depends only on (seed, dim, kind) (+-1 signs are the Philox words'
            bits in little-endian byte order, as on x86/ARM).
        kind: ``"rademacher"`` (+-1 entries, default) or ``"gaussian"`` (N(0, 1)).
        chunk: rows of R generated and multiplied per step (rounded up to a multiple of
            :data:`BLOCK_ROWS`); only speed and memory (O(chunk * dim)) depend on it.
        cache_bytes: keep the whole R (float32) after its first use if P * dim * 4 bytes fit;
            0 never caches.
    """

    def __init__(
        self,
        num_params: int,
        dim: int,
        seed: int = 0,
        kind: Kind = "rademacher",
        *,
        chunk: int | None = None,
        cache_bytes: int = 1 << 30,
    ):
        if num_params < 1 or dim < 1:
            raise ValueError(f"need num_params >= 1 and dim >= 1, got {num_params}, {dim}")
        if kind not in ("rademacher", "gaussian", "identity"):
            raise ValueError(f"unknown kind {kind!r}; expected 'rademacher' or 'gaussian'")
        if kind == "identity" and dim != num_params:
            raise ValueError("the identity projection keeps dim == num_params")
        self.num_params = int(num_params)
        self.dim = int(dim)
        self.seed = int(seed)
        self.kind = kind
        if chunk is None:
            chunk = max(1, CHUNK_BYTES // (4 * self.dim))
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = -(-int(chunk) // BLOCK_ROWS) * BLOCK_ROWS
        self.cache_bytes = int(cache_bytes)
        self._key = _philox_key(self.seed) if kind == "rademacher" else None
        self._cached: Tensor | None = None

    @classmethod
    def identity(cls, num_params: int) -> Projector:
        """No projection (phi(g) = g), for tests and small models."""
        return cls(num_params, num_params, kind="identity")

    def __repr__(self) -> str:
        return (
            f"Projector(num_params={self.num_params}, dim={self.dim}, seed={self.seed}, "
            f"kind={self.kind!r}, chunk={self.chunk}, cached={self._cached is not None})"
        )

    @property
    def sketch_bytes(self) -> int:
        """Bytes of the whole float32 sketch R (what caching would hold)."""
        return self.num_params * self.dim * 4

    @property
    def caches(self) -> bool:
        return self.kind != "identity" and self.sketch_bytes <= self.cache_bytes

    def _block(self, b: int, rows: int, out: Tensor) -> None:
        """Write rows 0..rows-1 of block ``b`` of R (unscaled) into ``out`` (rows, dim) float32."""
        if self.kind == "rademacher":
            counter = np.array([0, b, 0, 0], dtype=np.uint64)
            bits = np.random.Philox(key=self._key, counter=counter).random_raw(
                -(-BLOCK_ROWS * self.dim // 64)
            )
            u = np.unpackbits(bits.view(np.uint8), count=rows * self.dim)
            out.copy_(torch.from_numpy(u).view(rows, self.dim))
            out.mul_(2.0).sub_(1.0)
        else:
            g = torch.Generator().manual_seed(_mix(self.seed, b))
            full = torch.empty(BLOCK_ROWS, self.dim).normal_(generator=g)
            out.copy_(full[:rows])

    def sketch_rows(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Rows ``start:stop`` of R (unscaled float32; ``start`` a multiple of BLOCK_ROWS)."""
        if self.kind == "identity":
            return torch.eye(self.num_params)[start:stop]
        if start % BLOCK_ROWS:
            raise ValueError(f"start must be a multiple of {BLOCK_ROWS}")
        stop = min(stop, self.num_params)
        out = torch.empty(stop - start, self.dim) if out is None else out[: stop - start]
        for r in range(start, stop, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, stop - r)
            self._block(r // BLOCK_ROWS, rows, out[r - start : r - start + rows])
        return out

    def matrix(self) -> Tensor:
        """The whole sketch R / sqrt(dim) (P, dim) float32 -- for tests and small P only."""
        if self.kind == "identity":
            return torch.eye(self.num_params)
        return self.sketch_rows(0, self.num_params) / math.sqrt(self.dim)

    def project(self, grads: Tensor) -> Tensor:
        """phi of each row of ``grads`` (b, P) -> (b, dim), in float32 (float64 stays float64)."""
        if grads.ndim != 2 or grads.shape[1] != self.num_params:
            raise ValueError(f"expected gradients (b, {self.num_params}), got {tuple(grads.shape)}")
        dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
        g = grads.to(dtype)
        if self.kind == "identity":
            return g.clone()
        out = torch.zeros(g.shape[0], self.dim, dtype=dtype, device=g.device)
        cache = self._cached
        fill = cache is None and self.caches  # first call with caching: keep what is generated
        if fill:
            cache = torch.empty(self.num_params, self.dim)
        buf = None if cache is not None else torch.empty(self.chunk, self.dim)
        for start in range(0, self.num_params, self.chunk):
            stop = min(start + self.chunk, self.num_params)
            if cache is None:
                r = self.sketch_rows(start, stop, buf)
            elif fill:
                r = self.sketch_rows(start, stop, cache[start:stop])
            else:
                r = cache[start:stop]
            out.addmm_(g[:, start:stop], r.to(dtype=dtype, device=g.device))
        if fill:
            self._cached = cache
        return out.mul_(1.0 / math.sqrt(self.dim))

    __call__ = project


def _mix(seed: int, block: int) -> int:
    """A 63-bit seed for block ``block`` of the Gaussian sketch (splitmix64 of (seed, block))."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(block) + 0x632BE59BD9B4E019) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 1


# --------------------------------------------------------------------------------------
# Featurizing: per-example gradients streamed through the projector
# --------------------------------------------------------------------------------------


def featurize(
    model: nn.Module,
    params: Sequence[Tensor],
    measurement: Measurement,
    x0: Tensor,
    draws: dict[str, Tensor],
    projector: Projector,
    *,
    batch_size: int = 32,
    scale: float = 1.0,
    project_rows: int | None = None,
    draw_chunk: int | None = None,
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> Tensor:
    """Projected per-example gradients (N, k) float32 of ``scale * measurement``.

    Gradients come from :func:`~diffusion_attribution.gradients.per_example_gradients`
    (``batch_size`` examples per pass) and are projected ``project_rows`` at a time (default:
    as many as fit :data:`PROJECT_BYTES` = 128 MiB, at least ``batch_size``): more rows per call
    amortise generating the sketch (at k = 8192 on the tiny U-Net: 32 rows per call cost ~1.5x
    the time per row of 357 rows per call). Memory is that (project_rows, P) buffer, one
    gradient batch and the (N, k) result, never the (N, P) gradient matrix unless
    ``project_rows >= N``. ``timings``
    (if given) accumulates seconds under ``"gradients"`` and ``"projection"``. For training
    features pass ``scale=train_gradient_scale(D)`` (lbar = l / D, the influence convention).
    """
    from .gradients import per_example_gradients

    n = x0.shape[0]
    num_params = sum(p.numel() for p in params)
    if project_rows is None:
        project_rows = max(batch_size, PROJECT_BYTES // (4 * num_params))
    rows = int(project_rows)
    if rows < 1:
        raise ValueError(f"project_rows must be >= 1, got {project_rows}")
    rows = min(rows, n)
    timings = {} if timings is None else timings
    timings.setdefault("gradients", 0.0)
    timings.setdefault("projection", 0.0)
    out = torch.empty(n, projector.dim)
    buf: Tensor | None = None
    filled = 0  # rows of buf in use; they hold examples done - filled .. done - 1
    done = 0

    def flush() -> None:
        nonlocal filled
        start = time.perf_counter()
        out[done - filled : done] = projector.project(buf[:filled]).float()
        timings["projection"] += time.perf_counter() - start
        filled = 0

    stream = per_example_gradients(
        model,
        params,
        measurement,
        x0,
        draws,
        batch_size=batch_size,
        draw_chunk=draw_chunk,
        scale=scale,
        progress=progress,
    )
    it = iter(stream)
    while True:
        start = time.perf_counter()
        try:
            ids, g = next(it)
        except StopIteration:
            break
        timings["gradients"] += time.perf_counter() - start
        if ids.start != done:
            raise RuntimeError("per_example_gradients yielded batches out of order")
        if buf is None:
            buf = torch.empty(max(rows, g.shape[0]), g.shape[1], dtype=g.dtype)
        b = g.shape[0]
        if filled + b > buf.shape[0]:
            flush()
        buf[filled : filled + b] = g
        filled += b
        done += b
        del g
    if filled:
        flush()
    if done != n:
        raise RuntimeError(f"gradients covered {done} of {n} examples")
    return out


# --------------------------------------------------------------------------------------
# Scores
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
# Everything for one model: TRAK or D-TRAK
# --------------------------------------------------------------------------------------

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


def trak_attribute(
    model: nn.Module,
    params: Sequence[Tensor],
    train_images: Tensor,
    queries: Tensor,
    measurements: Mapping[str, Measurement],
    projector: Projector,
    dampings: Sequence[float],
    *,
    method: Literal["trak", "d-trak"] = "trak",
    query_measurement: str | None = None,
    train_draws: int,
    query_draws: int,
    seed: int,
    precision: Precision = "float32",
    batch_size: int = 16,
    project_rows: int | None = None,
    query_trajectories: Tensor | None = None,
    progress: bool = False,
) -> tuple[dict[float, Tensor], dict[str, float]]:
    """TRAK / D-TRAK scores (Q, N) for every damping, and timings in seconds.

    ``measurements`` maps names to measurements (as in
    :func:`~diffusion_attribution.influence.attribute`). Training features: gradients of
    ``TRAIN_MEASUREMENTS[method]`` (``"loss"`` or ``"square_norm"``) scaled to lbar = l / D,
    ``train_draws`` draws each with seed ``seed`` (drawn group by group, so memory does not
    grow with N). Query features: gradients of ``query_measurement`` (default: the same as the
    training one; for D-TRAK it must stay ``"square_norm"``), ``query_draws`` draws with seed
    ``seed + 1``, unscaled.
    """

    if method not in TRAIN_MEASUREMENTS:
        raise ValueError(f"unknown method {method!r}; expected 'trak' or 'd-trak'")
    train_name = TRAIN_MEASUREMENTS[method]
    query_name = query_measurement or train_name
    if method == "d-trak" and query_name != "square_norm":
        raise ValueError("D-TRAK uses the square norm for the query gradients too")
    for name in (train_name, query_name):
        if name not in measurements:
            raise ValueError(f"no measurement named {name!r}")
    timings: dict[str, float] = {}
    mq = measurements[query_name]
    q_ids = torch.arange(len(queries))
    q_draws = mq.draw(queries, q_ids, query_draws, seed + 1, trajectories=query_trajectories)
    qf = featurize(
        model,
        params,
        mq,
        queries,
        q_draws,
        projector,
        batch_size=batch_size,
        project_rows=project_rows,
        timings=timings,
    )
    n = len(train_images)
    tf = train_features(
        model,
        params,
        measurements[train_name],
        train_images,
        projector,
        train_draws=train_draws,
        seed=seed,
        batch_size=batch_size,
        project_rows=project_rows,
        timings=timings,
        progress=progress,
    )
    start = time.perf_counter()
    scores = trak_scores_sweep(qf, tf, dampings, n, precision)
    timings["scoring"] = time.perf_counter() - start
    return scores, timings


# --------------------------------------------------------------------------------------
# Similarity baselines (context, not influence estimates)
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# The baselines stage: every baseline score matrix in the influence stage's format
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
    progress: bool = False,
) -> tuple[dict, dict[str, float]]:
    """TRAK, D-TRAK and similarity scores keyed by :class:`~diffusion_attribution.influence.ScoreSpec`.

    Training features are computed once per method (loss for TRAK, square norm for D-TRAK) and
    query features once per measurement, then scored for every damping and precision:

    - ``ScoreSpec("trak", m, damping, precision)`` for m in ``query_measurements``,
    - ``ScoreSpec("d-trak", "square_norm", damping, precision)``,
    - ``ScoreSpec("grad_dot" | "grad_cos", m, 0.0, "float32")`` on the projected loss features
      (the identity in place of the Hessian), and ``ScoreSpec("pixel", "none", 0.0, "float32")``.

    Dampings are ``relative_dampings`` times the mean eigenvalue trace(F)/k of each method's
    projected empirical Fisher F = Phi^T Phi / N (the absolute value, normalised by N as in
    App. G.3.1, is the spec's ``damping``). Returns the scores and a dict with timings and the
    mean eigenvalues.
    """
    from .influence import ScoreSpec

    timings: dict[str, float] = {}
    info: dict[str, float] = {}
    n = len(train_images)
    kw = dict(
        train_draws=train_draws,
        seed=seed,
        batch_size=batch_size,
        timings=timings,
        progress=progress,
    )
    train = {
        "trak": train_features(model, params, measurements["loss"], train_images, projector, **kw),
        "d-trak": train_features(
            model, params, measurements["square_norm"], train_images, projector, **kw
        ),
    }
    q_ids = torch.arange(len(queries))
    query = {}
    for name in dict.fromkeys([*query_measurements, "square_norm"]):
        m = measurements[name]
        d = m.draw(queries, q_ids, query_draws, seed + 1, trajectories=query_trajectories)
        query[name] = featurize(
            model, params, m, queries, d, projector, batch_size=batch_size, timings=timings
        )
    start = time.perf_counter()
    scores = {}
    jobs = [("trak", m) for m in query_measurements] + [("d-trak", "square_norm")]
    for method, name in jobs:
        eig = mean_eigenvalue(train[method])
        info[f"mean_eigenvalue_{method}"] = eig
        dampings = [r * eig for r in relative_dampings]
        for precision in precisions:
            sweep = trak_scores_sweep(query[name], train[method], dampings, n, precision)
            for d, s in sweep.items():
                scores[ScoreSpec(method, name, d, precision)] = s
    for name in query_measurements:
        scores[ScoreSpec("grad_dot", name, 0.0, "float32")] = gradient_dot(
            query[name], train["trak"], n
        )
        scores[ScoreSpec("grad_cos", name, 0.0, "float32")] = gradient_cosine(
            query[name], train["trak"]
        )
    scores[ScoreSpec("pixel", "none", 0.0, "float32")] = pixel_similarity(queries, train_images)
    timings["scoring"] = time.perf_counter() - start
    return scores, {**timings, **info}
