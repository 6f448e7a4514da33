"""K-FAC factors by hooks (``factors``): equal to curvlinops' where both are deterministic,
to a brute-force computation with the same MC noise, and additive over shards of examples.

All checks in float64 on ``TINY_4X4`` (convolutions, token attention with Linear q/k/v/out,
a time-embedding MLP, GroupNorm), a few examples and draws.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_attribution.curvature.factors import (
    CorrectionSums,
    FactorSums,
    apply_corrections,
    combine,
    correction_sums,
    factor_sums,
    mc_noise,
    to_kfac,
)
from diffusion_attribution.curvature.kfac import KFAC, build_operator, fit_kfac, noisy_rows
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import DiffusionLoss
from diffusion_attribution.diffusion.unet import UNet, kfac_parameters
from tests.helpers import TINY_4X4

T = 10
SCHEDULE = NoiseSchedule.linear(T, 1e-3, 0.2)
F64 = torch.float64
N, S = 5, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return UNet(TINY_4X4).double().eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(N, 1, 4, 4, generator=g, dtype=F64)
    t = torch.randint(1, T + 1, (N, S), generator=g)
    eps = torch.randn(N, S, 1, 4, 4, generator=g, dtype=F64)
    return x0, t, eps


def rel(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def assert_blocks_equal(a: KFAC, b: KFAC, tol: float = 1e-10) -> None:
    """Same layers and kinds; raw factors (where both keep them) and dense blocks agree to
    ``tol`` relative to the largest block of their kind (TINY_4X4's attention keys have a
    summed output gradient that is 0 up to round-off: softmax ignores a shift of all keys)."""
    assert [(x.layer, x.kind) for x in a.blocks] == [(y.layer, y.kind) for y in b.blocks]
    pairs = {
        "A": [
            (x.A, y.A)
            for x, y in zip(a.blocks, b.blocks, strict=True)
            if x.A is not None and y.A is not None
        ],
        "G": [
            (x.G, y.G)
            for x, y in zip(a.blocks, b.blocks, strict=True)
            if x.G is not None and y.G is not None
        ],
        "dense": [(x.dense(), y.dense()) for x, y in zip(a.blocks, b.blocks, strict=True)],
    }
    assert len(pairs["G"]) == len(a.blocks) or a.meta.get("ekfac") or b.meta.get("ekfac")
    for name, uv in pairs.items():
        scale = max(float(torch.linalg.norm(v)) for _, v in uv)
        errs = [float(torch.linalg.norm(u - v)) / scale for u, v in uv]
        assert max(errs) < tol, (name, max(errs))


# ---------------------------------------------------------------------------------------------
# hooks == curvlinops (deterministic Fishers)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("fisher", ["empirical", "type2"])
def test_hooks_equal_curvlinops(net, data, fisher, kfac, separate):
    if fisher == "type2" and kfac == "reduce" and not separate:
        pytest.skip("type2 is an oracle: three of its four cases suffice")
    params = kfac_parameters(net)
    kw = dict(fisher=fisher, kfac=kfac, separate_weight_and_bias=separate, batch_size=4)
    hooks = fit_kfac(net, params, SCHEDULE, *data, backend="hooks", **kw)
    ref = fit_kfac(net, params, SCHEDULE, *data, backend="curvlinops", **kw)
    assert hooks.meta["backend"] == "hooks" and ref.meta["backend"] == "curvlinops"
    assert_blocks_equal(hooks, ref)
    assert {b.layer for b in hooks.blocks} >= {"conv_in", "down.0.attn.q", "temb_in"}
    # the hooks' K-FAC applied to vectors == curvlinops' own operator @ v
    op = build_operator(net, params, SCHEDULE, *data, **kw)
    V = torch.randn(3, hooks.num_params, dtype=F64, generator=torch.Generator().manual_seed(0))
    expected = (op @ V.T).T
    assert rel(hooks.matvec(V), expected) < 1e-10
    assert rel(hooks.matvec(V), V @ hooks.to_dense()) < 1e-12


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_ekfac_corrections_equal_curvlinops(net, data, kfac, separate):
    """In curvlinops' eigenbases the hooks' corrections equal curvlinops' EK-FAC eigenvalues.
    End to end (each in its own eigenbases) they agree for expand; for reduce the factors are
    rank-deficient in directions the per-row gradients still have, so the corrections depend
    on the (arbitrary) basis of those null spaces and only the K-FAC factors can agree."""
    params = kfac_parameters(net)
    kw = dict(fisher="empirical", kfac=kfac, separate_weight_and_bias=separate, batch_size=4)
    ref = fit_kfac(net, params, SCHEDULE, *data, backend="curvlinops", ekfac=True, **kw)
    corr = correction_sums(net, params, SCHEDULE, *data, ref, batch_size=3)
    mine = apply_corrections(ref, corr)
    scale = max(float(y.eig.abs().max()) for y in ref.blocks)
    for x, y in zip(mine.blocks, ref.blocks, strict=True):
        # (k.bias has a zero gradient -- softmax ignores q . b_k -- hence the atol)
        torch.testing.assert_close(x.eig, y.eig, rtol=1e-10, atol=1e-12 * scale)
    hooks = fit_kfac(net, params, SCHEDULE, *data, backend="hooks", ekfac=True, **kw)
    assert hooks.meta["ekfac"] and hooks.meta["backend"] == "hooks"
    if kfac == "expand":
        assert rel(hooks.to_dense(), ref.to_dense()) < 1e-10


# ---------------------------------------------------------------------------------------------
# MC: brute force with the same noise; curvlinops in expectation
# ---------------------------------------------------------------------------------------------


def _patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """(L, c_in * k1 * k2) patches of one image, by explicit slicing of the padded input."""
    (k1, k2), (s1, s2), (p1, p2) = conv.kernel_size, conv.stride, conv.padding
    xp = F.pad(x, (p2, p2, p1, p1))
    h = (xp.shape[1] - k1) // s1 + 1
    w = (xp.shape[2] - k2) // s2 + 1
    rows = [
        xp[:, i * s1 : i * s1 + k1, j * s2 : j * s2 + k2].flatten()
        for i in range(h)
        for j in range(w)
    ]
    return torch.stack(rows)


def brute_mc_factors(net, params, x0, t, eps, mc_seed, mc_samples, kfac):
    """A, G per layer, one row and one MC sample at a time: y = f + sqrt(1/2) xi with the noise
    of ``mc_noise``, gradients of ||y - f||^2 w.r.t. each layer's output by autograd."""
    modules = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    xt, tt, _ = noisy_rows(SCHEDULE, x0, t, eps)
    R, D = xt.shape[0], xt[0].numel()
    xi = mc_noise(mc_seed, range(x0.shape[0]), t.shape[1], mc_samples, x0.shape[1:], F64)
    xi = xi.reshape(R, mc_samples, D)
    A = {n: 0.0 for n, _ in modules}
    G = {n: 0.0 for n, _ in modules}
    for r in range(R):
        seen: dict = {}
        hooks = [
            m.register_forward_hook(
                lambda mod, i, o, n=n, seen=seen: seen.__setitem__(n, (i[0], o))
            )
            for n, m in modules
        ]
        f = net(xt[r : r + 1], tt[r : r + 1]).flatten()
        for h in hooks:
            h.remove()
        for n, m in modules:
            x = seen[n][0][0].detach()
            a = _patches(m, x) if isinstance(m, nn.Conv2d) else x.reshape(-1, x.shape[-1])
            if kfac == "reduce":
                a = a.mean(0, keepdim=True)
            A[n] = A[n] + a.T @ a / (R * (a.shape[0]))
        for i in range(mc_samples):
            y = f.detach() + math.sqrt(0.5) * xi[r, i]
            loss = (y - f).pow(2).sum()
            outs = [seen[n][1] for n, _ in modules]
            grads = torch.autograd.grad(loss, outs, retain_graph=True)
            for (n, m), g in zip(modules, grads, strict=True):
                b = g[0].flatten(1).T if isinstance(m, nn.Conv2d) else g[0].reshape(-1, g.shape[-1])
                if kfac == "reduce":
                    b = b.sum(0, keepdim=True)
                G[n] = G[n] + b.T @ b / (R * D * mc_samples)
    return A, G


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
def test_mc_hooks_equal_brute_force_with_same_noise(net, data, kfac):
    params = kfac_parameters(net)
    x0, t, eps = (d[:3] for d in data)
    A, G = brute_mc_factors(net, params, x0, t, eps, mc_seed=7, mc_samples=2, kfac=kfac)
    K = fit_kfac(
        net, params, SCHEDULE, x0, t, eps, kfac=kfac, mc_seed=7, mc_samples=2, batch_size=4
    )
    checked = 0
    # (reduce: attention keys' summed output gradient is 0 up to round-off -- softmax ignores a
    # shift of all keys -- so tolerances are relative to the largest factor)
    g_scale = max(float(g.abs().max()) for g in G.values())
    for b in K.blocks:
        torch.testing.assert_close(b.G, G[b.layer], rtol=1e-10, atol=1e-12 * g_scale)
        if b.kind == "weight":
            assert rel(b.A, A[b.layer]) < 1e-10, (b.layer, rel(b.A, A[b.layer]))
            checked += 1
    assert checked == len(A)


def test_mc_hooks_agree_with_curvlinops_in_expectation(net, data):
    """Different MC streams, the same matrix: with 300 MC samples per row both G factors lie
    within a few percent of the exact (type-2) one and of each other; A does not involve
    the MC draws and agrees exactly."""
    params = kfac_parameters(net)
    x0, t, eps = (d[:2] for d in data)
    kw = dict(mc_samples=300, batch_size=8, mc_seed=3)
    hooks = fit_kfac(net, params, SCHEDULE, x0, t, eps, backend="hooks", **kw)
    curv = fit_kfac(net, params, SCHEDULE, x0, t, eps, backend="curvlinops", **kw)
    exact = fit_kfac(net, params, SCHEDULE, x0, t, eps, fisher="type2")
    errs = []
    for h, c, e in zip(hooks.blocks, curv.blocks, exact.blocks, strict=True):
        if h.kind == "bias":
            continue
        assert rel(h.A, c.A) < 1e-12
        errs.append((rel(h.G, e.G), rel(c.G, e.G), rel(h.G, c.G)))
    worst = torch.tensor(errs).max(0).values
    # 4 rows x 300 samples: relative MC error of a d x d second moment ~ sqrt(d / 1200) <= 0.1
    assert float(worst.max()) < 0.25, worst
    assert float(torch.tensor(errs)[:, 2].median()) < 0.1, errs
    assert float(torch.tensor(errs)[:, 2].min()) > 0  # genuinely different MC streams


def test_mc_noise_depends_only_on_seed_and_example():
    a = mc_noise(5, [0, 1, 2], 3, 2, (1, 2, 2))
    assert a.shape == (3, 3, 2, 1, 2, 2)
    assert torch.equal(mc_noise(5, [2], 3, 2, (1, 2, 2))[0], a[2])
    assert not torch.equal(mc_noise(6, [2], 3, 2, (1, 2, 2))[0], a[2])
    # never the stream of the (t, eps) draws under the same seed
    x = torch.zeros(3, 1, 2, 2)
    d = DiffusionLoss(NoiseSchedule.linear(T)).draw(x, torch.arange(3), 3, 5)
    assert not torch.allclose(d["eps"][2].flatten(), a[2, :, 0].flatten())


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------

SHARDS = [(0, 2), (2, 3), (3, 5)]


def _shard_sums(net, params, data, tmp_path, **kw) -> FactorSums:
    x0, t, eps = data
    parts = []
    for i, (a, b) in enumerate(SHARDS):
        s = factor_sums(
            net, params, SCHEDULE, x0[a:b], t[a:b], eps[a:b], example_offset=a, batch_size=3, **kw
        )
        path = tmp_path / f"sums{i}.pt"
        s.save(path)
        torch.load(path, weights_only=True)  # plain tensors and containers only
        parts.append(FactorSums.load(path))
    return combine(parts[::-1])  # order does not matter


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_shards_combine_to_the_whole_fit(net, data, tmp_path, fisher, kfac):
    params = kfac_parameters(net)
    kw = dict(fisher=fisher, kfac=kfac, mc_seed=4, mc_samples=2 if fisher == "mc" else 1)
    combined = _shard_sums(net, params, data, tmp_path, **kw)
    whole = factor_sums(net, params, SCHEDULE, *data, batch_size=8, **kw)
    assert combined.num_rows == whole.num_rows == N * S
    assert combined.examples == whole.examples == [(0, N)]
    for sep in (True, False):
        a = to_kfac(combined, separate_weight_and_bias=sep)
        b = to_kfac(whole, separate_weight_and_bias=sep)
        assert_blocks_equal(a, b, tol=1e-12)
    ref = fit_kfac(net, params, SCHEDULE, *data, batch_size=5, **kw)  # another batching
    assert_blocks_equal(to_kfac(combined), ref, tol=1e-12)


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_ekfac_two_pass_shards(net, data, tmp_path, fisher, separate):
    params = kfac_parameters(net)
    x0, t, eps = data
    kw = dict(fisher=fisher, mc_seed=9)
    basis = to_kfac(
        _shard_sums(net, params, data, tmp_path, **kw), separate_weight_and_bias=separate
    )
    parts = []
    for i, (a, b) in enumerate(SHARDS):
        c = correction_sums(
            net, params, SCHEDULE, x0[a:b], t[a:b], eps[a:b], basis, example_offset=a, batch_size=3
        )
        c.save(tmp_path / f"corr{i}.pt")
        parts.append(CorrectionSums.load(tmp_path / f"corr{i}.pt"))
    sharded = apply_corrections(basis, combine(parts))
    whole = fit_kfac(
        net, params, SCHEDULE, *data, ekfac=True, separate_weight_and_bias=separate, **kw
    )
    assert sharded.meta["ekfac"]
    assert_blocks_equal(sharded, whole, tol=1e-12)
    # the EK-FAC eigenvalues are the diagonal of the per-row gradient second moment in the basis
    # (not the Kronecker products g_i a_j): they differ from the basis' own
    assert rel(sharded.eigenvalues(), basis.eigenvalues()) > 1e-3
    with pytest.raises(ValueError, match="examples"):
        apply_corrections(basis, combine(parts[:2]))
    other = to_kfac(factor_sums(net, params, SCHEDULE, *data, fisher="empirical", kfac="reduce"))
    with pytest.raises(ValueError, match="eigenbases"):
        apply_corrections(other, combine(parts))


def test_combine_refuses_overlaps_and_mixed_settings(net, data):
    params = kfac_parameters(net)
    x0, t, eps = data
    a = factor_sums(net, params, SCHEDULE, x0[:3], t[:3], eps[:3])
    b = factor_sums(net, params, SCHEDULE, x0[2:], t[2:], eps[2:], example_offset=2)
    with pytest.raises(ValueError, match="overlap"):
        a + b
    c = factor_sums(net, params, SCHEDULE, x0[3:], t[3:], eps[3:], example_offset=3, kfac="reduce")
    with pytest.raises(ValueError, match="different settings"):
        a + c
    d = factor_sums(net, params, SCHEDULE, x0[3:], t[3:], eps[3:], example_offset=3, mc_seed=1)
    with pytest.raises(ValueError, match="different settings"):
        a + d
    with pytest.raises(ValueError, match="at least one"):
        combine([])
    with pytest.raises(ValueError, match="not a"):
        FactorSums.from_state_dict({"format": "x"})


def test_bad_arguments_name_what_is_wrong(net, data):
    params = kfac_parameters(net)
    with pytest.raises(ValueError, match="fisher"):
        factor_sums(net, params, SCHEDULE, *data, fisher="ggn")
    with pytest.raises(ValueError, match="kfac"):
        factor_sums(net, params, SCHEDULE, *data, kfac="both")
    with pytest.raises(ValueError, match="backend"):
        fit_kfac(net, params, SCHEDULE, *data, backend="jax")
    norm = next(m for m in net.modules() if isinstance(m, nn.GroupNorm))
    with pytest.raises(ValueError, match="GroupNorm"):
        factor_sums(net, [norm.weight, *params], SCHEDULE, *data)
    with pytest.raises(ValueError, match="not the weight or bias"):
        factor_sums(net, [nn.Parameter(torch.zeros(2, dtype=F64))], SCHEDULE, *data)
