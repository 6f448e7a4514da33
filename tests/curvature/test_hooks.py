"""The hooks backend (:mod:`diffusion_attribution.curvature.hooks`): K-FAC factors equal to
curvlinops' where both are deterministic, to a brute-force computation with the same MC noise,
and to curvlinops' in expectation for MC.

All checks in float64 on ``TINY_4X4`` (``net`` and ``data`` of ``tests/curvature/conftest.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_attribution.curvature.curvlinops_backend import build_operator
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.curvature.hooks import correction_sums, factor_sums, mc_noise
from diffusion_attribution.curvature.partial_sums import apply_corrections
from diffusion_attribution.curvature.rows import noisy_rows
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import DiffusionLoss
from diffusion_attribution.diffusion.unet import kfac_parameters
from tests.curvature.oracles import (
    F64,
    SCHEDULE,
    ConvAttnEps,
    T,
    assert_blocks_equal,
    rel_fro,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert rel_fro(hooks.matvec(V), expected) < 1e-10
    assert rel_fro(hooks.matvec(V), V @ hooks.to_dense()) < 1e-12


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
        assert rel_fro(hooks.to_dense(), ref.to_dense()) < 1e-10


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
            assert rel_fro(b.A, A[b.layer]) < 1e-10, (b.layer, rel_fro(b.A, A[b.layer]))
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
        assert rel_fro(h.A, c.A) < 1e-12
        errs.append((rel_fro(h.G, e.G), rel_fro(c.G, e.G), rel_fro(h.G, c.G)))
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
# bad arguments
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# fisher="example": eq. 11 as written, the outer product of each example's gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kfac", ["expand", "reduce"])
def test_example_fisher_is_the_per_draw_one_with_one_or_identical_draws(net, data, kfac):
    """With one draw per example, or S identical draws, an example's gradient is its draw's:
    the per-example and the per-draw empirical Fisher agree on every layer type."""
    params = kfac_parameters(net)
    x0, t, eps = data
    one = (x0, t[:, :1], eps[:, :1])
    same = (x0, t[:, :1].repeat(1, 3), eps[:, :1].repeat(1, 3, 1, 1, 1))
    for draws in (one, same):
        per_draw = fit_kfac(net, params, SCHEDULE, *draws, fisher="empirical", kfac=kfac)
        per_example = fit_kfac(net, params, SCHEDULE, *draws, fisher="example", kfac=kfac)
        assert rel_fro(per_example.to_dense(), per_draw.to_dense()) < 1e-12
    # with distinct draws they differ: the per-example gradient averages the draws first
    per_draw = fit_kfac(net, params, SCHEDULE, *data, fisher="empirical", kfac=kfac)
    per_example = fit_kfac(net, params, SCHEDULE, *data, fisher="example", kfac=kfac)
    assert rel_fro(per_example.to_dense(), per_draw.to_dense()) > 1e-2


def test_example_fisher_equals_the_exact_per_example_outer_product_where_kfac_is_exact():
    """One example, S = 3 draws at the same timestep: the time-embedding layer's input (t / T)
    is the same for every draw, so K-FAC of the per-example empirical Fisher is exact on its
    blocks: (1/D) g g^T with g the float64 autograd gradient of the example's summed squared
    error averaged over its draws (eq. 11)."""
    torch.manual_seed(0)
    net = ConvAttnEps().to(F64)
    params = kfac_parameters(net)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 1, 4, 4, generator=g, dtype=F64)
    t = torch.full((1, 3), 5)
    eps = torch.randn(1, 3, 1, 4, 4, generator=g, dtype=F64)
    K = fit_kfac(net, params, SCHEDULE, x0, t, eps, fisher="example").to_dense()
    xt, tt, y = noisy_rows(SCHEDULE, x0, t, eps, 0, 3)
    loss = ((y - net(xt, tt).flatten(1)) ** 2).sum(1).mean()  # the draws' mean
    grads = torch.autograd.grad(loss, params)
    offsets = torch.tensor([0, *(p.numel() for p in params)]).cumsum(0)
    D = x0[0].numel()
    for p, gp, a, b in zip(params, grads, offsets[:-1], offsets[1:], strict=True):
        if p is net.temb.weight or p is net.temb.bias:
            exact = torch.outer(gp.flatten(), gp.flatten()) / D
            assert rel_fro(K[a:b, a:b], exact) < 1e-10, p.shape
    # on a layer whose input varies with the draw (conv_in sees x_t) it is an approximation
    a, b = offsets[0], offsets[1]
    g0 = grads[0].flatten()
    assert rel_fro(K[a:b, a:b], torch.outer(g0, g0) / D) > 1e-3
