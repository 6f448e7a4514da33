"""Seeded Johnson-Lindenstrauss projection of per-example gradients (paper App. G.3.1).

TRAK and D-TRAK (:mod:`diffusion_attribution.trak`) work with random projections of
per-example gradients; this module makes them: :class:`Projector` (the sketch) and
:func:`featurize` (gradients streamed through it).

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
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from .gradients import per_example_gradients
from .measurements import Measurement

__all__ = ["BLOCK_ROWS", "CHUNK_BYTES", "PROJECT_BYTES", "Kind", "Projector", "featurize"]

Kind = Literal["rademacher", "gaussian", "identity"]

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
    ``project_rows >= N``. ``timings`` (if given) accumulates seconds under ``"gradients"``
    and ``"projection"``. For training
    features pass ``scale=train_gradient_scale(D)`` (lbar = l / D, the influence convention).
    """
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
