"""Seeded Johnson-Lindenstrauss projection of per-example gradients (paper App. G.3.1).

TRAK and D-TRAK (:mod:`diffusion_attribution.attribution.trak`) work with random projections of
per-example gradients; this module makes them: :class:`Projector` (the sketch) and
:func:`featurize` (gradients streamed through it).

Random projection (:class:`Projector`)
--------------------------------------
phi(g) = g @ R / sqrt(k) with R (P, k) of i.i.d. +-1 (Rademacher) or N(0, 1) entries, so that
E[phi(g)^T phi(h)] = g^T h (Johnson-Lindenstrauss). R is never held whole unless it fits
``cache_bytes`` (the cache then lives on the gradients' device). Its rows come in blocks of
:data:`BLOCK_ROWS` = 64 rows, and every block is generated *on the device of the gradients*
with torch integer ops from a counter-based hash -- no numpy, no host -> device copy of any
part of R:

* the key of block b (rows 64 b .. 64 b + 63) is the 64-bit integer

      key_b = mix64(mix64(seed) + (b + 1) * 0x9E3779B97F4A7C15 mod 2^64),

  mix64 being splitmix64's finaliser (computed in Python ints), and k1 = key_b mod 2^32,
  k2 = key_b div 2^32;
* word i of block b is the 32-bit hash h_b(i) = L(L(i XOR k1) XOR k2), with L Wellons'
  ``lowbias32`` finaliser, x -> x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B;
  x ^= x >> 16 (mod 2^32), computed in int64 tensors with explicit ``& 0xFFFFFFFF`` after each
  product (int64 products wrap; every shifted value is non-negative), hence exact and the same
  on every device (16 int64 ops per word after two exact identities, :meth:`_Hasher.words`);
* **Rademacher**: with the block read row-major, entry e = (r mod 64) * k + c holding R[r, c]
  is bit j = e mod 32 of word i = e div 32: R[r, c] = 1 - 2 * bit (bit 1 -> -1). The
  bits become float32 +-1 without arithmetic: the word as int32 (int64 -> int32 keeps the low
  32 bits, two's complement, on CPU and CUDA) shifted left by 31 - j puts bit j
  in the sign bit, ``& 0x80000000 | 0x3F800000`` makes it -1.0 or +1.0 (three int32 passes over
  a cache-sized chunk). So R is *bit-identical* whatever ``chunk``, whatever the rows projected
  per call, whatever the device (``tests/attribution/test_projection.py`` checks it against a
  pure-Python hash, and on CUDA against the CPU);
* **Gaussian**: Box-Muller, entries 2p and 2p + 1 of the block from words 2p and 2p + 1:
  u1 = (h(2p) div 2^8 + 1) / 2^24 in (0, 1], u2 = (h(2p + 1) div 2^8) / 2^24 in [0, 1) (both
  exact in float32), R = sqrt(-2 ln u1) * (cos, sin)(2 pi u2) in float32 (|entries| <= 5.77,
  the 24-bit uniforms truncate the tails beyond 5.77 sd: probability 1e-8). The integer part is
  exact everywhere; log, cos and sin are float32 library functions whose last bit may differ
  between CPU and CUDA (and, for an odd k, between torch thread counts, which split a block at
  other places): the Gaussian sketch is bit-identical for any ``chunk`` and rows per call on
  one device, and equal up to that rounding (~1e-7 relative) across devices.

The sketch is a function of (seed, k, kind) only.

Measured design (``benchmarks/bench_trak.py --only-generators --options``: tiny U-Net,
P = 175,569, 357 random gradients, 1 torch thread on a 2-core AMD EPYC with AVX-512), wall
seconds per 357 rows of +-1 entries at k = 8192, at a 1-min load of 7-8 from other jobs on
the 2 cores (2-4x the quiet-machine times, too noisy to rank the options):

    option                         k      rows/call  s per 357 rows
    regenerate, chunk 64 rows      8192   32         55.5
    regenerate, chunk 64 rows      8192   357        46.3
    regenerate, chunk 512 rows     8192   32         63.4
    regenerate, chunk 512 rows     8192   357        19.0
    regenerate, 4 MiB (default)    8192   32         42.4
    regenerate, 4 MiB (default)    8192   357        27.9

The float32 GEMM (b x P x k, ~60-80 GFLOP/s per core) is the floor. Generation: the hash costs
16 int64 ops per 32 entries (~10 G entries/s alone on a quiet core), the unpack three int32
ops per entry (~7 G/s), together ~3.5-4 G entries/s on one core: as fast as numpy's Philox +
``np.unpackbits`` on the CPU, and ~10-40x traker's ``normal_`` / ``bernoulli_``, which
traker's CPU projector redraws for the whole sketch on every call. Measured side by side
(``bench_trak.py --only-generators``, k = 8192, real TRAK gradients, one thread, CPU seconds
at a 1-min load of 8.6 on the 2 cores, best of 2 interleaved rounds):

    sketch                    one pass of R   G entries/s   s/batch of 32   s/batch of 191
    this (torch hash)         0.40            3.58          1.95            7.33
    numpy Philox + unpackbits 0.45            3.21          2.16            7.18
    traker BasicProjector     4.06 (normal_)  0.35          5.45            --

(batches of 191, featurize's default, are GEMM-bound: equal within the noise.)
Rejected unpacks (1M entries, one thread): a (256, 8) float32 lookup table indexed by the
bytes (0.45 ms against 0.15 ms), broadcast ``(w >> j) & 1`` to float (0.74 ms), ``copysign``
(0.29 ms), two int32 lanes per int64 op (no faster); sub-chunks of 64-512 KiB for the unpack
(no faster: per-op overhead). So: chunked regeneration by default (4 MiB
chunks on the CPU, where they stay in cache; :data:`DEVICE_CHUNK_BYTES` on an accelerator,
where fewer, larger kernels matter); a cache (only when P * k * 4 bytes fits ``cache_bytes``)
saves the generation; more rows per call help most, hence :func:`featurize` buffers
``project_rows`` gradients. Also rejected: bfloat16 GEMMs (2.4x faster on this CPU, but torch
has no bf16 x bf16 -> float32 matmul there, so the features would be rounded to 8 mantissa
bits); ``2 g @ B - rowsum(g)`` with a 0/1 matrix B (one pass fewer, but it cancels ~log2
sqrt(P) bits of the result).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_attribution.core.devices import synchronize
from diffusion_attribution.diffusion.gradients import per_example_gradients
from diffusion_attribution.diffusion.measurements import Measurement

__all__ = [
    "BLOCK_ROWS",
    "CHUNK_BYTES",
    "DEVICE_CHUNK_BYTES",
    "PROJECT_BYTES",
    "Kind",
    "Projector",
    "block_key",
    "featurize",
]

Kind = Literal["rademacher", "gaussian", "identity"]

#: Rows of the sketch R hashed under one key (the unit of the seed schedule).
BLOCK_ROWS = 64
#: Bytes of sketch generated and multiplied per step on the CPU when ``chunk`` is not given
#: (cache-sized).
CHUNK_BYTES = 4 << 20
#: The same on any other device (CUDA): fewer, larger kernels.
DEVICE_CHUNK_BYTES = 256 << 20
#: Default bytes of gradients buffered per projection call in :func:`featurize`.
PROJECT_BYTES = 128 << 20

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
#: lowbias32 (C. Wellons, "Prospecting for hash functions", 2018): shifts and multipliers.
_LOWBIAS32 = ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None))


def _mix64(z: int) -> int:
    """splitmix64's finaliser (Steele, Lea and Flood 2014) on a 64-bit Python int."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def block_key(seed: int, block: int) -> int:
    """key_b = mix64(mix64(seed) + (b + 1) * golden mod 2^64): the (b + 1)-th output of
    splitmix64 started at mix64(seed), the 64-bit key of rows 64 b .. 64 b + 63 of R."""
    return _mix64((_mix64(int(seed)) + (int(block) + 1) * _GOLDEN) & _M64)


def _lowbias32_(x: Tensor, tmp: Tensor, *, first: bool = True, last: bool = True) -> Tensor:
    """lowbias32 in place on int64 ``x`` holding values in [0, 2^32) (``tmp``: scratch);
    ``first`` / ``last`` = False skip its first / last step x ^= x >> 16 (done by the caller).

    x * c < 2^64 may wrap in int64; its low 32 bits are exact and ``& 0xFFFFFFFF`` keeps just
    them, so every value shifted right is non-negative and the shifts are logical."""
    for step, (shift, mult) in enumerate(_LOWBIAS32):
        if (step or first) and (mult is not None or last):
            torch.bitwise_right_shift(x, shift, out=tmp)
            x.bitwise_xor_(tmp)
        if mult is not None:
            x.mul_(mult).bitwise_and_(_M32)
    return x


class _Hasher:
    """Scratch and constants for hashing ``words`` words of up to ``blocks`` blocks on
    ``device`` (allocated once per :meth:`Projector.project` call, reused chunk by chunk)."""

    def __init__(self, keys: Tensor, blocks: int, words: int, device: torch.device):
        self.keys = keys  # (num_blocks, 2) int64 on device: k ^ (k >> 16) for k = k1, k2
        index = torch.arange(words, dtype=torch.int64, device=device)
        self.index = index ^ (index >> 16)
        self.x = torch.empty(blocks, words, dtype=torch.int64, device=device)
        self.tmp = torch.empty_like(self.x)
        self.h32 = torch.empty(blocks, words, dtype=torch.int32, device=device)
        self.shifts = 31 - torch.arange(32, dtype=torch.int32, device=device)

    def words(self, b0: int, nb: int) -> Tensor:
        """h_b(i) = L(L(i ^ k1) ^ k2) for blocks b0 .. b0 + nb - 1 and every word i: (nb,
        words) int64, in 16 int64 ops instead of 22 by two exact identities of the xorshift
        S(y) = y ^ (y >> 16) on 32-bit y: S(a ^ b) = S(a) ^ S(b), and S(S(y)) = y (the last
        step of the first L and the first of the second cancel). So with S(i) precomputed
        and S(k1), S(k2) in the key table, h = L'(L''(S(i) ^ S(k1)) ^ S(k2)), L'' / L' being
        L without its first / last S."""
        x, tmp, keys = self.x[:nb], self.tmp[:nb], self.keys[b0 : b0 + nb]
        torch.bitwise_xor(self.index, keys[:, :1], out=x)
        _lowbias32_(x, tmp, first=False, last=False)
        x.bitwise_xor_(keys[:, 1:])
        return _lowbias32_(x, tmp, first=False)

    def signs(self, b0: int, nb: int, out: Tensor) -> None:
        """+-1 entries of nb blocks into ``out`` (contiguous float32, nb * 64 * k entries)."""
        h32 = self.h32[:nb]
        h32.copy_(self.words(b0, nb))  # int64 -> int32 keeps the low 32 bits (two's complement)
        bits = out.view(torch.int32).view(-1, 32)
        torch.bitwise_left_shift(h32.view(-1, 1), self.shifts, out=bits)  # bit j -> bit 31
        bits.bitwise_and_(-(1 << 31)).bitwise_or_(0x3F800000)  # sign | exponent of 1.0

    def gaussians(self, b0: int, nb: int, out: Tensor) -> None:
        """N(0, 1) entries of nb blocks into ``out`` (float32, nb * 64 * k entries), by
        Box-Muller, one block per step (so the float ops never depend on nb)."""
        per_block = self.x.shape[1]
        for j in range(nb):
            w = self.words(b0 + j, 1).view(-1, 2)
            u1 = (w[:, 0] >> 8).add_(1).to(torch.float32).mul_(2.0**-24)  # (0, 1]
            u2 = (w[:, 1] >> 8).to(torch.float32).mul_(2.0**-24)  # [0, 1)
            r = u1.log_().mul_(-2.0).sqrt_()
            theta = u2.mul_(2 * math.pi)
            o = out[j * per_block : (j + 1) * per_block].view(-1, 2)
            torch.mul(r, torch.cos(theta), out=o[:, 0])
            torch.mul(r, theta.sin_(), out=o[:, 1])


class Projector:
    """Seeded Johnson-Lindenstrauss projection phi(g) = g @ R / sqrt(dim) (module docstring).

    Args:
        num_params: P, the length of the gradients (flat layout of ``gradients``).
        dim: k, the projected dimension.
        seed: an integer in [0, 2^64); R depends only on (seed, dim, kind), bit for bit
            (module docstring: the hash, and the Gaussian's float rounding across devices).
        kind: ``"rademacher"`` (+-1 entries, default) or ``"gaussian"`` (N(0, 1)).
        chunk: rows of R generated and multiplied per step (rounded up to a multiple of
            :data:`BLOCK_ROWS`); only speed and memory (O(chunk * dim)) depend on it. Default:
            :data:`CHUNK_BYTES` of float32 on the CPU, :data:`DEVICE_CHUNK_BYTES` elsewhere.
        cache_bytes: keep the whole R (float32, on the gradients' device) after its first use
            if P * dim * 4 bytes fit; 0 never caches.

    R is generated on the device of the gradients passed to :meth:`project` (or the device
    asked of :meth:`sketch_rows` / :meth:`matrix`).
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
        if not 0 <= int(seed) <= _M64:
            raise ValueError(f"seed must be in [0, 2^64), got {seed}")
        if kind != "identity" and BLOCK_ROWS * dim > 1 << 32:
            raise ValueError(f"dim must be <= 2^26 (word indices of a block are 32-bit), got {dim}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.num_params = int(num_params)
        self.dim = int(dim)
        self.seed = int(seed)
        self.kind = kind
        self._chunk_given = None if chunk is None else _round_to_blocks(int(chunk))
        #: Rows per step on the CPU (the explicit ``chunk``, rounded, if given).
        self.chunk = self.chunk_rows(torch.device("cpu"))
        self.cache_bytes = int(cache_bytes)
        self._keys: dict[torch.device, Tensor] = {}
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

    @property
    def num_blocks(self) -> int:
        return -(-self.num_params // BLOCK_ROWS)

    def chunk_rows(self, device: torch.device | str) -> int:
        """Rows of R generated per step on ``device`` (a multiple of :data:`BLOCK_ROWS`)."""
        if self._chunk_given is not None:
            return self._chunk_given
        budget = CHUNK_BYTES if torch.device(device).type == "cpu" else DEVICE_CHUNK_BYTES
        return _round_to_blocks(max(1, budget // (4 * self.dim)))

    # ---- generation -------------------------------------------------------------------

    def _hasher(self, device: torch.device, blocks: int) -> _Hasher:
        device = torch.device(device)
        if device not in self._keys:
            keys = [block_key(self.seed, b) for b in range(self.num_blocks)]
            halves = [(k & _M32, k >> 32) for k in keys]  # k1, k2
            table = torch.tensor(
                [[a ^ (a >> 16), b ^ (b >> 16)] for a, b in halves], dtype=torch.int64
            )
            self._keys[device] = table.to(device)  # the keys, not the sketch
        words_per_row = 2 if self.kind == "rademacher" else 64  # 32 or 1 entries per word
        blocks = 1 if self.kind == "gaussian" else blocks
        return _Hasher(self._keys[device], blocks, words_per_row * self.dim, device)

    def _fill(self, hasher: _Hasher, b0: int, nb: int, out: Tensor) -> None:
        """Blocks b0 .. b0 + nb - 1 of R (unscaled) into contiguous float32 ``out``."""
        if self.kind == "rademacher":
            hasher.signs(b0, nb, out)
        else:
            hasher.gaussians(b0, nb, out)

    def _rows(
        self, hasher: _Hasher, start: int, stop: int, out: Tensor, scratch: Tensor | None = None
    ) -> Tensor:
        """Rows start:stop of R into ``out`` (>= stop - start rows). Whole blocks are written
        straight into ``out`` when it is contiguous float32 with room for them, else into
        ``scratch`` (or a new buffer) and copied."""
        b0, b1 = start // BLOCK_ROWS, -(-stop // BLOCK_ROWS)
        full = (b1 - b0) * BLOCK_ROWS
        if out.is_contiguous() and out.dtype == torch.float32 and out.shape[0] >= full:
            self._fill(hasher, b0, b1 - b0, out[:full].view(-1))
            return out[: stop - start]
        if scratch is None or scratch.shape[0] < full:
            scratch = torch.empty(full, self.dim, device=out.device)
        self._fill(hasher, b0, b1 - b0, scratch[:full].view(-1))
        out[: stop - start].copy_(scratch[: stop - start])
        return out[: stop - start]

    def sketch_rows(
        self,
        start: int,
        stop: int,
        out: Tensor | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Rows ``start:stop`` of R (unscaled float32; ``start`` a multiple of BLOCK_ROWS), on
        ``out``'s device if given, else on ``device`` (default CPU)."""
        device = torch.device(out.device if out is not None else (device or "cpu"))
        if self.kind == "identity":
            return torch.eye(self.num_params, device=device)[start:stop]
        if start % BLOCK_ROWS:
            raise ValueError(f"start must be a multiple of {BLOCK_ROWS}")
        if not 0 <= start < min(stop, self.num_params):
            raise ValueError(f"need 0 <= start < min(stop, {self.num_params}), got {start}, {stop}")
        stop = min(stop, self.num_params)
        blocks = -(-stop // BLOCK_ROWS) - start // BLOCK_ROWS
        if out is None:
            out = torch.empty(blocks * BLOCK_ROWS, self.dim, device=device)
        elif out.shape[0] < stop - start or tuple(out.shape[1:]) != (self.dim,):
            raise ValueError(f"out must hold ({stop - start}, {self.dim}), got {tuple(out.shape)}")
        return self._rows(self._hasher(device, blocks), start, stop, out)

    def matrix(self, device: torch.device | str | None = None) -> Tensor:
        """The whole sketch R / sqrt(dim) (P, dim) float32 -- for tests and small P only (the
        scaling rounded as in :meth:`project`: times the float32 1 / sqrt(dim))."""
        if self.kind == "identity":
            return torch.eye(self.num_params, device=device)
        return self.sketch_rows(0, self.num_params, device=device).mul_(1.0 / math.sqrt(self.dim))

    # ---- projection -------------------------------------------------------------------

    def project(self, grads: Tensor) -> Tensor:
        """phi of each row of ``grads`` (b, P) -> (b, dim) on grads' device, in float32
        (float64 stays float64). R is generated (or cached) on that device."""
        if grads.ndim != 2 or grads.shape[1] != self.num_params:
            raise ValueError(f"expected gradients (b, {self.num_params}), got {tuple(grads.shape)}")
        dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
        g = grads.to(dtype)
        if self.kind == "identity":
            return g.clone()
        device = g.device
        out = torch.zeros(g.shape[0], self.dim, dtype=dtype, device=device)
        cache = self._cached if self._cached is not None and self._cached.device == device else None
        fill = cache is None and self.caches  # first call on this device: keep what is generated
        chunk = self.chunk_rows(device)
        if cache is None:
            hasher = self._hasher(device, chunk // BLOCK_ROWS)
            buf = torch.empty(chunk, self.dim, device=device)
            if fill:
                cache = torch.empty(self.num_params, self.dim, device=device)
        for start in range(0, self.num_params, chunk):
            stop = min(start + chunk, self.num_params)
            if fill:
                r = self._rows(hasher, start, stop, cache[start:stop], buf)
            elif cache is not None:
                r = cache[start:stop]
            else:
                r = self._rows(hasher, start, stop, buf, buf)
            out.addmm_(g[:, start:stop], r if dtype == torch.float32 else r.to(dtype))
        if fill:
            self._cached = cache
        return out.mul_(1.0 / math.sqrt(self.dim))

    __call__ = project


def _round_to_blocks(rows: int) -> int:
    return -(-rows // BLOCK_ROWS) * BLOCK_ROWS


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
    labels: Tensor | None = None,
) -> Tensor:
    """Projected per-example gradients (N, k) float32 of ``scale * measurement``, on the
    device of ``params`` (the model's: gradients, sketch and result all stay there).

    Gradients come from :func:`~diffusion_attribution.diffusion.gradients.per_example_gradients`
    (``batch_size`` examples per pass) and are projected ``project_rows`` at a time (default:
    as many as fit :data:`PROJECT_BYTES` = 128 MiB, at least ``batch_size``): more rows per call
    amortise generating the sketch (at k = 8192 on the tiny U-Net: 32 rows per call cost ~1.5x
    the time per row of 357 rows per call). Memory is that (project_rows, P) buffer, one
    gradient batch and the (N, k) result, never the (N, P) gradient matrix unless
    ``project_rows >= N``. ``timings`` (if given) accumulates seconds under ``"gradients"``
    and ``"projection"``. For training
    features pass ``scale=train_gradient_scale(D)`` (lbar = l / D, the influence convention).
    ``labels`` (N,): the examples' classes, for a class-conditional model
    (:func:`~diffusion_attribution.diffusion.gradients.per_example_gradients`).
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
    device = params[0].device if len(params) else torch.device("cpu")
    out = torch.empty(n, projector.dim, device=device)
    buf: Tensor | None = None
    filled = 0  # rows of buf in use; they hold examples done - filled .. done - 1
    done = 0

    def flush() -> None:
        nonlocal filled
        start = time.perf_counter()
        out[done - filled : done] = projector.project(buf[:filled]).float()
        synchronize(out.device)
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
        labels=labels,
    )
    it = iter(stream)
    while True:
        start = time.perf_counter()
        try:
            ids, g = next(it)
            synchronize(g.device)
        except StopIteration:
            break
        timings["gradients"] += time.perf_counter() - start
        if ids.start != done:
            raise RuntimeError("per_example_gradients yielded batches out of order")
        if buf is None:
            buf = torch.empty(max(rows, g.shape[0]), g.shape[1], dtype=g.dtype, device=g.device)
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
