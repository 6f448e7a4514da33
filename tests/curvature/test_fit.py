"""The fit (:func:`~diffusion_attribution.curvature.fit.fit_kfac`, paper Sec. 3.1): brute-force
float64 checks on tiny eps-models (:mod:`tests.curvature.oracles` states the normalisation
under test), both backends, EK-FAC, determinism, and the errors a bad fit raises."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import Tensor, nn

from diffusion_attribution.curvature.curvlinops_backend import build_operator, kfac_from_operator
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.curvature.rows import noisy_rows
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.unet import kfac_parameters
from tests.curvature.oracles import (
    F64,
    SCHEDULE,
    ConvAttnEps,
    LinearEps,
    MLPEps,
    T,
    assert_close,
    block_diag_mask,
    brute_ef,
    brute_ggn,
    draws,
    make,
    rel_fro,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# 1. exactness against the brute-force GGN
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,s", [(1, 1), (3, 1), (1, 3)])
def test_type2_single_linear_joint_is_exact(n, s):
    """One Linear layer (output layer, constant loss Hessian): K-FAC with the bias folded into
    A is exact, G = 2/D I and A = mean of a a^T over rows, for any number of rows."""
    model = make(LinearEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(n, s)
    K = fit_kfac(
        model, params, SCHEDULE, x0, t, eps, fisher="type2", separate_weight_and_bias=False
    )
    ggn = brute_ggn(model, params, x0, t, eps)
    assert_close(K.to_dense(), ggn)
    (blk,) = K.blocks
    assert blk.kind == "joint"
    assert_close(blk.G, 2.0 / 4 * torch.eye(4, dtype=F64))


def test_type2_single_linear_separate_and_no_bias():
    model = make(LinearEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(1, 1)
    K = fit_kfac(model, params, SCHEDULE, x0, t, eps, fisher="type2")
    assert [b.kind for b in K.blocks] == ["weight", "bias"]
    ggn, dense = brute_ggn(model, params, x0, t, eps), K.to_dense()
    mask = block_diag_mask(K)
    assert_close(dense[mask], ggn[mask])  # weight and bias blocks exact ...
    assert torch.all(dense[~mask] == 0) and ggn[~mask].abs().max() > 1e-3  # ... no coupling
    nobias = make(LinearEps, bias=False)
    p2 = kfac_parameters(nobias)
    K2 = fit_kfac(nobias, p2, SCHEDULE, x0, t, eps, fisher="type2")
    assert_close(K2.to_dense(), brute_ggn(nobias, p2, x0, t, eps))


@pytest.mark.parametrize("separate", [False, True])
def test_type2_mlp_one_row_block_diagonal_is_exact(separate):
    """For a single datum and no weight sharing every K-FAC block equals the GGN's block."""
    model = make(MLPEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(1, 1, seed=3)
    K = fit_kfac(
        model, params, SCHEDULE, x0, t, eps, fisher="type2", separate_weight_and_bias=separate
    )
    ggn, dense = brute_ggn(model, params, x0, t, eps), K.to_dense()
    mask = block_diag_mask(K)
    assert_close(dense[mask], ggn[mask])
    assert torch.all(dense[~mask] == 0)


# ---------------------------------------------------------------------------------------------
# 2. MC Fisher converges to the GGN
# ---------------------------------------------------------------------------------------------


def test_mc_fisher_converges_to_ggn():
    model = make(LinearEps)
    params = kfac_parameters(model)
    x0, t1, eps1 = draws(1, 1)
    ggn = brute_ggn(model, params, x0, t1, eps1)
    errors = {}
    for s in (16, 256, 4096):  # one row repeated s times, a fresh MC target each time
        t, eps = t1.expand(1, s), eps1.expand(1, s, *x0.shape[1:])
        K = fit_kfac(model, params, SCHEDULE, x0, t, eps, mc_seed=1, separate_weight_and_bias=False)
        errors[s] = rel_fro(K.to_dense(), ggn)
    # expected relative error sqrt((D + 1) / s): 0.56, 0.14, 0.035
    assert errors[16] > errors[256] > errors[4096], errors
    assert errors[4096] < 0.1 and errors[16] > 0.2, errors
    # the same through mc_samples on a single row, in both backends
    for backend in ("hooks", "curvlinops"):
        K = fit_kfac(
            model,
            params,
            SCHEDULE,
            x0,
            t1,
            eps1,
            mc_samples=4096,
            separate_weight_and_bias=False,
            backend=backend,
        )
        assert rel_fro(K.to_dense(), ggn) < 0.1, backend


# ---------------------------------------------------------------------------------------------
# 3. empirical Fisher scaling
# ---------------------------------------------------------------------------------------------


def test_empirical_fisher_one_row_scaling():
    """One row, one Linear: K-FAC(EF) = D g g^T exactly (g: grad of the per-pixel-mean MSE),
    curvlinops' own operator."""
    model = make(LinearEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(1, 1, seed=5)
    K = fit_kfac(
        model, params, SCHEDULE, x0, t, eps, fisher="empirical", separate_weight_and_bias=False
    )
    xt, tt, y = noisy_rows(SCHEDULE, x0, t, eps)
    loss = (model(xt, tt).flatten(1) - y).pow(2).mean()
    g = torch.cat([gi.flatten() for gi in torch.autograd.grad(loss, params)])
    assert_close(K.to_dense(), 4 * torch.outer(g, g))  # D = 4
    assert_close(brute_ef(model, params, x0, t, eps), 4 * torch.outer(g, g))
    op = build_operator(
        model, params, SCHEDULE, x0, t, eps, fisher="empirical", separate_weight_and_bias=False
    )
    assert_close(kfac_from_operator(op, params).to_dense(), 4 * torch.outer(g, g))  # D = 4
    # MLP, one row: every block of the EF is rank one, K-FAC reproduces it
    mlp = make(MLPEps)
    p2 = kfac_parameters(mlp)
    K2 = fit_kfac(mlp, p2, SCHEDULE, x0, t, eps, fisher="empirical")
    mask = block_diag_mask(K2)
    assert_close(K2.to_dense()[mask], brute_ef(mlp, p2, x0, t, eps)[mask])


class ResidualEps(nn.Module):
    """A Linear eps-model whose residuals are exactly N(0, I/2): on data that is one image x0
    at one timestep t, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, and the prediction
    c (x_t - sqrt(abar) x0) / sqrt(1 - abar) = c eps leaves eps - c eps = (1 - c) eps, which
    is N(0, I/2) for c = 1 - 1/sqrt(2)."""

    def __init__(self, x0: Tensor, t: int, shape=(1, 2, 2)):
        super().__init__()
        self.shape = shape
        d = math.prod(shape)
        ab = SCHEDULE.alpha_bars[t].double()
        c = 1 - 1 / math.sqrt(2)
        self.lin = nn.Linear(d, d).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(d, dtype=F64) * c / (1 - ab).sqrt())
            self.lin.bias.copy_(-c * ab.sqrt() * x0.flatten() / (1 - ab).sqrt())

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.lin(x.flatten(1)).reshape(-1, *self.shape)


@pytest.mark.parametrize("kind", ["expand", "reduce"])
def test_empirical_equals_mc_fisher_when_residuals_are_model_noise(kind):
    """Where the model's residuals are N(0, I/2), the data's targets are draws from the
    model's own predictive distribution, so the empirical and the MC Fisher are the same
    matrix in expectation: fitted on 4000 rows, their K-FAC factors agree up to Monte Carlo
    error (and a 1/D rescaling of either would break the agreement by a factor D = 4)."""
    g = torch.Generator().manual_seed(11)
    shape, t_step, n = (1, 2, 2), 5, 4000
    x0 = torch.randn(1, *shape, generator=g, dtype=F64)
    model = ResidualEps(x0[0], t_step, shape)
    params = kfac_parameters(model)
    x0s = x0.expand(n, *shape).contiguous()
    t = torch.full((n, 1), t_step)
    eps = torch.randn(n, 1, *shape, generator=g, dtype=F64)
    xt, tt, y = noisy_rows(SCHEDULE, x0s, t, eps)
    with torch.no_grad():
        residual = y - model(xt, tt).flatten(1)
    assert float(residual.var()) == pytest.approx(0.5, rel=0.05)  # the construction holds
    kw = dict(kfac=kind, batch_size=1000)
    mc = fit_kfac(model, params, SCHEDULE, x0s, t, eps, fisher="mc", mc_seed=1, **kw)
    emp = fit_kfac(model, params, SCHEDULE, x0s, t, eps, fisher="empirical", **kw)
    # relative Monte Carlo error of a 4x4 second-moment matrix from 4000 rows: ~ 2-3%
    assert rel_fro(emp.to_dense(), mc.to_dense()) < 0.1
    assert emp.mean_eigenvalue() == pytest.approx(mc.mean_eigenvalue(), rel=0.1)


# ---------------------------------------------------------------------------------------------
# 4. expand vs reduce
# ---------------------------------------------------------------------------------------------


def test_expand_reduce_coincide_without_weight_sharing_only():
    x0, t, eps = draws(3, 2)
    lin = make(LinearEps)
    pl = kfac_parameters(lin)
    e, r = (fit_kfac(lin, pl, SCHEDULE, x0, t, eps, kfac=k) for k in ("expand", "reduce"))
    assert_close(e.to_dense(), r.to_dense(), rtol=1e-12)
    x0, t, eps = draws(3, 2, shape=(1, 4, 4))
    conv = make(ConvAttnEps)
    pc = kfac_parameters(conv)
    e, r = (fit_kfac(conv, pc, SCHEDULE, x0, t, eps, kfac=k) for k in ("expand", "reduce"))
    assert rel_fro(r.to_dense(), e.to_dense()) > 0.05
    for layer in ("conv_in", "q", "conv_out"):  # weight-sharing layers differ
        (we,) = [b for b in e.blocks if b.layer == layer and b.kind == "weight"]
        (wr,) = [b for b in r.blocks if b.layer == layer and b.kind == "weight"]
        assert rel_fro(wr.dense(), we.dense()) > 1e-3
    (we,) = [b for b in e.blocks if b.layer == "temb" and b.kind == "weight"]
    (wr,) = [b for b in r.blocks if b.layer == "temb" and b.kind == "weight"]
    # the time embedding's Linear sees (B, 1) inputs: no sharing, identical blocks (its output
    # is broadcast over pixels after the layer, which autograd sums before the layer's hook)
    assert_close(wr.A, we.A)
    assert_close(wr.G, we.G)


# ---------------------------------------------------------------------------------------------
# 5. EK-FAC
# ---------------------------------------------------------------------------------------------


def test_ekfac_eigenvalues_are_ef_diagonal_in_kronecker_eigenbasis():
    """Empirical EK-FAC: E = diag((Q_G (x) Q_A)^T EF_block (Q_G (x) Q_A)) for every block, with
    EF the brute-force empirical Fisher of per-row gradients (weight sharing included)."""
    model = make(ConvAttnEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(3, 2, shape=(1, 4, 4), seed=4)
    ef = brute_ef(model, params, x0, t, eps)
    for separate in (True, False):
        K = fit_kfac(
            model,
            params,
            SCHEDULE,
            x0,
            t,
            eps,
            fisher="empirical",
            ekfac=True,
            separate_weight_and_bias=separate,
        )
        scale = float(ef.diagonal().max())
        for b in K.blocks:
            idx = b.flat_index().flatten()
            Q = torch.kron(b.QG, b.QA)
            diag = torch.diagonal(Q.T @ ef[idx[:, None], idx[None, :]] @ Q)
            # (k.bias has an exactly zero gradient: softmax ignores q . b_k; atol covers it)
            torch.testing.assert_close(
                b.eigenvalues().flatten(), diag, rtol=1e-9, atol=1e-12 * scale
            )


def test_ekfac_equals_kfac_for_one_row_without_sharing():
    model = make(MLPEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(1, 1, seed=6)
    Ks = [fit_kfac(model, params, SCHEDULE, x0, t, eps, ekfac=e) for e in (False, True)]
    assert_close(Ks[1].to_dense(), Ks[0].to_dense(), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# 6. determinism
# ---------------------------------------------------------------------------------------------


def test_determinism_and_mc_seed():
    model = make(ConvAttnEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(4, 2, shape=(1, 4, 4))
    a, b, c = (
        fit_kfac(model, params, SCHEDULE, x0, t, eps, mc_seed=s, batch_size=3) for s in (0, 0, 1)
    )
    for ba, bb, bc in zip(a.blocks, b.blocks, c.blocks, strict=True):
        assert torch.equal(ba.G, bb.G) and torch.equal(ba.eigenvalues(), bb.eigenvalues())
        assert not torch.equal(ba.G, bc.G)  # MC targets differ
        if ba.kind == "weight":
            assert torch.equal(ba.A, bb.A)
            assert torch.equal(ba.A, bc.A)  # inputs do not depend on the MC draw
    V = torch.randn(2, a.num_params, dtype=F64)
    assert torch.equal(a.inverse_apply(V, 1e-3), b.inverse_apply(V, 1e-3))
    e1, e2 = (
        fit_kfac(model, params, SCHEDULE, x0, t, eps, fisher="empirical", mc_seed=s) for s in (0, 1)
    )
    assert all(torch.equal(p.G, q.G) for p, q in zip(e1.blocks, e2.blocks, strict=True))


def test_dropout_is_off_and_mode_restored():
    model = make(ConvAttnEps)
    model.conv_out = nn.Sequential(nn.Dropout(0.5), model.conv_out)
    params = kfac_parameters(model)
    model.train()
    x0, t, eps = draws(2, 2, shape=(1, 4, 4))
    a, b = (fit_kfac(model, params, SCHEDULE, x0, t, eps) for _ in range(2))
    assert all(torch.equal(p.G, q.G) for p, q in zip(a.blocks, b.blocks, strict=True))
    assert model.training


# ---------------------------------------------------------------------------------------------
# 7. NaN and bad inputs
# ---------------------------------------------------------------------------------------------


def test_nan_factor_raises_naming_layer(tmp_path):
    model = make(ConvAttnEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(2, 1, shape=(1, 4, 4))
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="layer 'conv_in'"):  # its G is NaN first
        fit_kfac(model, params, SCHEDULE, x0, t, eps, backend="curvlinops")
    for fisher in ("mc", "empirical"):  # the hooks name the layer whose output is NaN
        with pytest.raises(FloatingPointError, match="output of layer 'conv_out'"):
            fit_kfac(model, params, SCHEDULE, x0, t, eps, fisher=fisher)
    model = make(ConvAttnEps)
    params = kfac_parameters(model)
    state = fit_kfac(model, params, SCHEDULE, x0, t, eps).state_dict()
    (blk,) = [b for b in state["blocks"] if b["layer"] == "k" and b["kind"] == "weight"]
    blk["eig_a"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(FloatingPointError, match="layer 'k'"):
        KFAC.load(tmp_path / "nan.pt")


def test_unsupported_params_and_bad_inputs():
    model = make(ConvAttnEps)
    x0, t, eps = draws(2, 1, shape=(1, 4, 4))
    with pytest.raises(ValueError, match="fisher"):
        fit_kfac(model, kfac_parameters(model), SCHEDULE, x0, t, eps, fisher="ggn")
    with pytest.raises(ValueError, match="timesteps"):
        fit_kfac(model, kfac_parameters(model), SCHEDULE, x0, t + T, eps)
    with pytest.raises(ValueError, match="eps must have shape"):
        fit_kfac(model, kfac_parameters(model), SCHEDULE, x0, t, eps[:, :, :, :2])
    norm = nn.GroupNorm(1, 1).double()
    wrapped = nn.ModuleDict({"norm": norm, "net": model})
    with pytest.raises(NotImplementedError):  # curvlinops: only Linear/Conv2d parameters
        build_operator(_Call(wrapped), [norm.weight, *kfac_parameters(model)], SCHEDULE, x0, t, eps)


class _Call(nn.Module):
    def __init__(self, inner: nn.ModuleDict):
        super().__init__()
        self.inner = inner

    def forward(self, x, t):
        return self.inner["net"](self.inner["norm"](x), t)


# ---------------------------------------------------------------------------------------------
# 8. smoke test on the repo's TINY_DIGITS U-Net
# ---------------------------------------------------------------------------------------------


def test_tiny_digits_unet_smoke(digits_unet):
    model = digits_unet
    params = kfac_parameters(model)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    schedule = NoiseSchedule.linear(1000)
    t = torch.randint(1, 1001, (16, 2), generator=g)
    eps = torch.randn(16, 2, 1, 8, 8, generator=g)
    P = sum(p.numel() for p in params)
    V = torch.randn(3, P, generator=g)
    times = {}
    for fisher in ("mc", "empirical"):
        for approx in ("expand", "reduce"):
            t0 = time.perf_counter()
            K = fit_kfac(model, params, schedule, x0, t, eps, fisher=fisher, kfac=approx)
            times[f"{fisher}/{approx}"] = time.perf_counter() - t0
            ev = K.eigenvalues()
            assert ev.shape == (P,) and torch.isfinite(ev).all() and float(ev.min()) >= 0
            assert float(ev.mean()) > 0
            X = K.inverse_apply(V, 1e-3 * K.mean_eigenvalue())
            assert X.shape == V.shape and X.dtype == torch.float32 and torch.isfinite(X).all()
    print("TINY_DIGITS fit times (N=16, S=2):", {k: f"{v:.2f}s" for k, v in times.items()})
