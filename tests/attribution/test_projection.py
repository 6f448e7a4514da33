"""The seeded projector: its counter-based sketch (by a pure-Python hash), invariances (bit for
bit), Johnson-Lindenstrauss statistics, devices, and featurize streaming."""

import math

import pytest
import torch

from diffusion_attribution.attribution import projection
from diffusion_attribution.attribution.influence import train_gradient_scale
from diffusion_attribution.attribution.projection import BLOCK_ROWS, Projector, block_key, featurize
from diffusion_attribution.diffusion.gradients import gradient_matrix
from diffusion_attribution.diffusion.measurements import make_measurement

KINDS = ["rademacher", "gaussian"]
CPU = torch.device("cpu")

#: Tiny ops: several OpenMP threads only contend (60x slower beside a busy process).
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the hash, in plain ints

M32, M64 = 0xFFFFFFFF, (1 << 64) - 1


def ref_splitmix64(state):
    """Vigna's splitmix64 step on a Python int: (new state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def ref_key(seed, block):
    """The (block + 1)-th splitmix64 output from the state mix64(seed) (mix64(seed) is the
    first output of a generator started at seed - golden)."""
    _, state = ref_splitmix64((seed - 0x9E3779B97F4A7C15) & M64)
    for _ in range(block + 1):
        state, out = ref_splitmix64(state)
    return out


def lowbias32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def ref_word(seed, block, i):
    key = ref_key(seed, block)
    return lowbias32(lowbias32(i ^ (key & M32)) ^ (key >> 32))


def ref_sign(seed, dim, row, col):
    """R[row, col]: bit e mod 32 of word e div 32 of block row div 64, e = (row mod 64) dim +
    col; bit 1 -> -1."""
    e = (row % BLOCK_ROWS) * dim + col
    return 1 - 2 * ((ref_word(seed, row // BLOCK_ROWS, e // 32) >> (e % 32)) & 1)


def ref_gaussian(seed, dim, row, col):
    """Box-Muller from words 2p, 2p + 1 (p = e div 2), in float64."""
    e = (row % BLOCK_ROWS) * dim + col
    b, p = row // BLOCK_ROWS, e // 2
    u1 = ((ref_word(seed, b, 2 * p) >> 8) + 1) / 2**24
    u2 = (ref_word(seed, b, 2 * p + 1) >> 8) / 2**24
    trig = math.cos if e % 2 == 0 else math.sin
    return math.sqrt(-2 * math.log(u1)) * trig(2 * math.pi * u2)


def test_block_keys_are_splitmix64_outputs():
    # seed 0: mix64(0) = 0, so the keys are splitmix64's outputs from state 0, whose first
    # three values are published (Vigna, splitmix64.c)
    published = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [block_key(0, b) for b in range(3)] == published
    assert [ref_key(0, b) for b in range(3)] == published
    for seed, b in [(1, 0), (5, 3), (12345, 77), (2**64 - 1, 2)]:
        assert block_key(seed, b) == ref_key(seed, b)
    assert len({block_key(s, b) for s in range(20) for b in range(50)}) == 1000


def test_lowbias32_by_hand():
    # x = 1: 1 ^ 0 = 1; * 0x7FEB352D = 0x7FEB352D; ^ (>> 15 = 0xFFD6) = 0x7FEBCAFB; the second
    # product's low 32 bits (Python ints) and the last xorshift:
    x = (0x7FEBCAFB * 0x846CA68B) & M32
    assert lowbias32(1) == x ^ (x >> 16) == 0x688990C0
    assert lowbias32(0) == 0  # a bijection fixing 0: the keys make word 0 of a block random
    # the torch version (int64 tensors, wrapping products, masks) on words that exercise the
    # top bit and the wrap of int64 products
    words = [0, 1, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, M32]
    x = torch.tensor(words, dtype=torch.int64)
    projection._lowbias32_(x, torch.empty_like(x))
    assert x.tolist() == [lowbias32(w) for w in words]


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_signs_by_pure_python_hash(seed):
    """Every entry of a small sketch (two blocks, the second partial; k not a multiple of 32,
    so words straddle rows) against the pure-Python hash."""
    p, k = 70, 5
    r = Projector(p, k, seed=seed).sketch_rows(0, p)
    expected = torch.tensor([[float(ref_sign(seed, k, i, j)) for j in range(k)] for i in range(p)])
    assert torch.equal(r, expected)


def test_signs_of_a_few_entries_of_larger_blocks():
    p, k = 3 * BLOCK_ROWS + 10, 96
    r = Projector(p, k, seed=3).sketch_rows(0, p)
    for i, j in [(0, 0), (0, 31), (0, 32), (1, 0), (63, 95), (64, 0), (130, 47), (p - 1, k - 1)]:
        assert r[i, j].item() == ref_sign(3, k, i, j)


def test_gaussian_by_pure_python_box_muller():
    p, k = 70, 6
    r = Projector(p, k, seed=4, kind="gaussian").sketch_rows(0, p).double()
    expected = torch.tensor(
        [[ref_gaussian(4, k, i, j) for j in range(k)] for i in range(p)], dtype=torch.float64
    )
    # float32 against float64: 2 pi u2 is rounded to float32 (error <= 4e-7 in the angle, times
    # r <= 5.77), log / cos / sin to a few ulps
    err = (r - expected).abs()
    assert float(err.max()) < 5e-6
    assert float((err / expected.abs().clamp(min=1e-3)).median()) < 1e-6


# ------------------------------------------------------------------ invariances, bit for bit


def one_hot(rows, p, dtype=torch.float32):
    return torch.eye(p, dtype=dtype)[rows]


@pytest.mark.parametrize("kind", KINDS)
def test_sketch_is_bitwise_independent_of_chunk_and_rows_per_call(kind):
    """R by sketch_rows in any pieces, and R / sqrt(k) read back through project() of one-hot
    gradients (each output a single product, summed with exact zeros) for any chunk, rows per
    call and cache: all bit-identical."""
    p, k = 300, 40
    ref = Projector(p, k, seed=9, kind=kind).sketch_rows(0, p)
    pieces = [(0, 64), (64, 128), (128, 300)]
    pr = Projector(p, k, seed=9, kind=kind)
    assert torch.equal(torch.cat([pr.sketch_rows(a, b) for a, b in pieces]), ref)
    out = torch.empty(500, k)  # a larger buffer, and a non-contiguous one
    assert torch.equal(pr.sketch_rows(64, 300, out), ref[64:])
    strided = torch.empty(k, 300).T
    assert torch.equal(pr.sketch_rows(0, 300, strided), ref)
    scaled = ref * (1.0 / math.sqrt(k))  # the rounding of project's scaling
    assert torch.equal(pr.matrix(), scaled)
    for chunk in (1, BLOCK_ROWS, 100, 129, 5000):
        for cache in (0, 1 << 30):
            proj = Projector(p, k, seed=9, kind=kind, chunk=chunk, cache_bytes=cache)
            for rows_per_call in (1, 7, p):
                got = torch.cat(
                    [
                        proj.project(one_hot(range(i, min(i + rows_per_call, p)), p))
                        for i in range(0, p, rows_per_call)
                    ]
                )
                assert torch.equal(got, scaled), (chunk, cache, rows_per_call)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_agrees_across_chunks_and_batches(kind):
    """Dense gradients: the same up to float32 summation order, and equal to g @ R / sqrt(k)."""
    p, k = 1000, 48  # P not a multiple of the block, k not a multiple of 32
    grads = torch.randn(7, p, generator=torch.Generator().manual_seed(1))
    ref = Projector(p, k, seed=5, kind=kind, cache_bytes=0).project(grads)
    assert ref.shape == (7, k) and ref.dtype == torch.float32
    tol = {"rtol": 0, "atol": 1e-5 * float(ref.abs().max())}
    pr = Projector(p, k, seed=5, kind=kind, cache_bytes=0)
    parts = torch.cat([pr.project(grads[i : i + 3]) for i in range(0, 7, 3)])
    torch.testing.assert_close(parts, ref, **tol)
    for chunk in (1, BLOCK_ROWS, 200, 5000):
        other = Projector(p, k, seed=5, kind=kind, chunk=chunk, cache_bytes=0)
        torch.testing.assert_close(other.project(grads), ref, **tol)
    cached = Projector(p, k, seed=5, kind=kind, cache_bytes=1 << 30)
    assert cached.caches
    torch.testing.assert_close(cached.project(grads), ref, **tol)
    torch.testing.assert_close(cached.project(grads[:2]), ref[:2], **tol)
    torch.testing.assert_close(grads @ pr.matrix(), ref, **tol)
    diff = Projector(p, k, seed=6, kind=kind).project(grads)
    assert (diff - ref).abs().max() > 0.1 * ref.abs().max()


def test_float64_stays_float64_and_identity():
    g = torch.randn(3, 130, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pr = Projector(130, 4, seed=0)
    out = pr.project(g)
    assert out.dtype == torch.float64
    # the +-1 entries are exact in float64: the result is g @ R in float64 (not rounded to
    # float32)
    exact = g @ pr.sketch_rows(0, 130).double() / 2.0
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)
    ident = Projector.identity(10)
    x = torch.randn(3, 10, dtype=torch.float64)
    assert torch.equal(ident.project(x), x)
    with pytest.raises(ValueError, match=r"\(b, 130\)"):
        pr.project(torch.randn(3, 131))


# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize("kind", KINDS)
def test_entries_are_balanced_and_blocks_and_seeds_uncorrelated(kind):
    p, k = 8 * BLOCK_ROWS, 256  # 8 blocks of 16384 entries
    r = Projector(p, k, seed=0, kind=kind).sketch_rows(0, p).double()
    n = r.numel()
    if kind == "rademacher":
        assert set(r.unique().tolist()) == {-1.0, 1.0}
        # every bit position of the hash words is balanced (entries e = 32 i + j)
        per_bit = r.reshape(-1, 32).mean(dim=0)
        assert per_bit.abs().max() < 4.5 / math.sqrt(n / 32)
    else:
        assert abs(float(r.var()) - 1) < 4 * math.sqrt(2 / n)
        assert abs(float(r.pow(4).mean()) - 3) < 4 * math.sqrt(96 / n)  # Var z^4 = 96
        assert float(r.abs().max()) <= math.sqrt(-2 * math.log(2.0**-24)) + 1e-6
        # the cos and sin of one Box-Muller pair are uncorrelated
        pairs = r.reshape(-1, 2)
        assert abs(float((pairs[:, 0] * pairs[:, 1]).mean())) < 4 / math.sqrt(n / 2)
    assert abs(float(r.mean())) < 4 / math.sqrt(n)
    blocks = r.reshape(8, -1)
    corr = blocks @ blocks.T / blocks.shape[1]
    off = corr - torch.diag(torch.diag(corr))
    assert off.abs().max() < 4 / math.sqrt(blocks.shape[1])  # distinct blocks
    other = Projector(p, k, seed=1, kind=kind).sketch_rows(0, p).double()
    assert abs(float((r * other).mean())) < 4 / math.sqrt(n)  # distinct seeds
    neighbours = (r[:, :-1] * r[:, 1:]).mean()  # neighbouring columns (bits of one word)
    assert abs(float(neighbours)) < 4 / math.sqrt(n)


@pytest.mark.parametrize("kind", KINDS)
def test_inner_products_are_unbiased(kind):
    """E[phi(g) . phi(h)] = g . h over independent seeds, within 4 standard errors; the
    spread is the JL variance ((|g|^2 |h|^2 + (g.h)^2 - c) / k, c = 2 sum g_i^2 h_i^2 for +-1
    entries and 0 for Gaussian ones)."""
    p, k, seeds = 200, 16, 300
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, p, generator=gen, dtype=torch.float64)
    x[1] += 0.8 * x[0]  # a correlated pair
    exact = x @ x.T
    phis = [Projector(p, k, seed=s, kind=kind).project(x) for s in range(seeds)]
    est = torch.stack([f @ f.T for f in phis])
    sq = x.pow(2)
    c = 2 * sq @ sq.T if kind == "rademacher" else 0.0
    var = (x.norm(dim=1)[:, None] ** 2 * x.norm(dim=1)[None, :] ** 2 + exact**2 - c) / k
    z = (est.mean(0) - exact) / (var / seeds).sqrt()
    assert z.abs().max() < 4
    ratio = est.var(0) / var  # the spread is the predicted one (sampling error ~ 8% at 300)
    assert ((ratio > 0.7) & (ratio < 1.3)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_johnson_lindenstrauss(kind):
    """Inner products survive projection to k = 2048 with errors of order |x||y| / sqrt(k)."""
    p, k = 10_000, 2048
    g = torch.Generator().manual_seed(0)
    common = torch.randn(p, generator=g, dtype=torch.float64)
    x = torch.randn(6, p, generator=g, dtype=torch.float64)
    x[:3] += 1.5 * common
    x[4] *= 10.0
    phi = Projector(p, k, seed=3, kind=kind).project(x)
    exact, approx = x @ x.T, phi @ phi.T
    norms = x.norm(dim=1)
    sd = ((norms[:, None] * norms[None, :]) ** 2 + exact**2).sqrt() / math.sqrt(k)
    z = (approx - exact) / sd
    assert z.abs().max() < 5.0
    rms = float(z.pow(2).mean().sqrt())
    assert 0.3 < rms < 1.6


# ------------------------------------------------------------------ devices


def test_projection_stays_on_the_gradients_device():
    p, k = 200, 24
    g = torch.randn(5, p, device=CPU)
    for cache in (0, 1 << 30):
        pr = Projector(p, k, seed=2, cache_bytes=cache)
        out = pr.project(g)
        assert out.device == CPU
        assert pr.sketch_rows(0, 64, device=CPU).device == CPU
        if cache:
            assert pr._cached is not None and pr._cached.device == CPU
    assert Projector(p, k).matrix(device=CPU).device == CPU


cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: the CPU/GPU bit-identity of the sketch is checked on a GPU only",
)


@cuda
def test_cuda_sketch_equals_cpu_sketch_bitwise():
    dev = torch.device("cuda")
    for p, k in [(70, 5), (1000, 48), (3 * BLOCK_ROWS + 1, 4096)]:
        cpu = Projector(p, k, seed=11).sketch_rows(0, p)
        gpu = Projector(p, k, seed=11).sketch_rows(0, p, device=dev)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), cpu)
        g_cpu = Projector(p, k, seed=11, kind="gaussian").sketch_rows(0, p)
        g_gpu = Projector(p, k, seed=11, kind="gaussian").sketch_rows(0, p, device=dev).cpu()
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-5, atol=1e-6)  # log / cos rounding
    p, k = 1000, 48
    grads = torch.randn(6, p, generator=torch.Generator().manual_seed(0))
    for cache in (0, 1 << 30):
        pr = Projector(p, k, seed=1, cache_bytes=cache)
        out = pr.project(grads.to(dev))
        assert out.device.type == "cuda"
        if cache:
            assert pr._cached.device.type == "cuda"
        ref = Projector(p, k, seed=1).project(grads)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
        # one-hot rows read the sketch back exactly on the GPU too
        onehot = Projector(p, k, seed=1, cache_bytes=cache).project(one_hot(range(p), p).to(dev))
        assert torch.equal(onehot.cpu(), Projector(p, k, seed=1).matrix())


# ------------------------------------------------------------------ arguments


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        Projector(10, 5, kind="sparse")
    with pytest.raises(ValueError, match="seed"):
        Projector(10, 5, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        Projector(10, 5, seed=2**64)
    with pytest.raises(ValueError, match="chunk"):
        Projector(10, 5, chunk=0)
    with pytest.raises(ValueError, match="dim"):
        Projector(10, 2**26 + 1)
    with pytest.raises(ValueError, match="identity"):
        Projector(10, 5, kind="identity")
    pr = Projector(200, 5)
    with pytest.raises(ValueError, match="multiple"):
        pr.sketch_rows(3, 10)
    with pytest.raises(ValueError, match="out must hold"):
        pr.sketch_rows(0, 100, torch.empty(50, 5))
    assert Projector(10, 5, chunk=100).chunk == 2 * BLOCK_ROWS
    assert Projector(10, 8192).chunk_rows("cpu") == BLOCK_ROWS * 2  # 4 MiB at k = 8192
    assert Projector(10, 8192).chunk_rows("cuda") == 8192  # 256 MiB


# ------------------------------------------------------------------ featurize


@pytest.mark.parametrize("name", ["loss", "square_norm"])
def test_featurize_streams_like_the_gradient_matrix(tiny, name):
    model, params, schedule, x = tiny
    meas = make_measurement(name, schedule)
    draws = meas.draw(x, torch.arange(len(x)), 3, seed=1)
    p = sum(t.numel() for t in params)
    proj = Projector(p, 40, seed=2, cache_bytes=0)
    scale = train_gradient_scale(16)
    full = gradient_matrix(model, params, meas, x, draws, batch_size=7, scale=scale)
    expected = proj.project(full)
    timings = {}
    got = featurize(
        model,
        params,
        meas,
        x,
        draws,
        proj,
        batch_size=2,
        scale=scale,
        project_rows=3,
        timings=timings,
    )
    assert got.device == params[0].device == CPU
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert timings["gradients"] > 0 and timings["projection"] > 0
    got1 = featurize(model, params, meas, x, draws, proj, batch_size=4, scale=scale, project_rows=1)
    torch.testing.assert_close(got1, expected, rtol=1e-4, atol=1e-7)
