"""K-FAC curvature (paper Sec. 3.1): brute-force float64 checks on tiny eps-models.

Normalisation under test (module docstring of ``curvature``): with R rows, D outputs per row,
J_r the Jacobian of row r's flattened prediction and g_r the gradient of row r's
per-pixel-mean squared error,
    GGN (type2 / MC)  = 2 / (R D) sum_r J_r^T J_r,
    empirical Fisher  = D / R   sum_r g_r g_r^T   (= 1 / (R D) sum_r g^_r g^_r^T with g^_r
                                                  the gradient of the summed squared error:
                                                  the MC Fisher's scale, as in curvlinops).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import Tensor, nn

from diffusion_attribution.curvature.kfac import (
    KFAC,
    DenseCurvature,
    build_operator,
    fit_kfac,
    noisy_rows,
)
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.unet import UNet, kfac_parameters
from tests.helpers import TINY_DIGITS

T = 10
SCHEDULE = NoiseSchedule.linear(T, 1e-3, 0.2)
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: threads only add overhead, and oversubscribed cores are very slow."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# tiny eps-models (float64)
# ---------------------------------------------------------------------------------------------


class LinearEps(nn.Module):
    """flatten -> Linear(D, D) -> reshape; t ignored (no weight sharing)."""

    def __init__(self, shape=(1, 2, 2), bias: bool = True):
        super().__init__()
        self.shape = shape
        d = math.prod(shape)
        self.lin = nn.Linear(d, d, bias=bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.lin(x.flatten(1)).reshape(-1, *self.shape)


class MLPEps(nn.Module):
    """[flatten(x), t / T] -> Linear -> tanh -> Linear -> reshape (no weight sharing)."""

    def __init__(self, shape=(1, 2, 2), hidden: int = 3):
        super().__init__()
        self.shape = shape
        d = math.prod(shape)
        self.l1 = nn.Linear(d + 1, hidden)
        self.l2 = nn.Linear(hidden, d)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.cat([x.flatten(1), (t.to(x.dtype) / T)[:, None]], dim=1)
        return self.l2(torch.tanh(self.l1(h))).reshape(-1, *self.shape)


class ConvAttnEps(nn.Module):
    """Conv2d -> (+ Linear time embedding) -> token self-attention (Linear q/k/v) -> Conv2d."""

    def __init__(self, c: int = 2):
        super().__init__()
        self.conv_in = nn.Conv2d(1, c, 3, padding=1)
        self.temb = nn.Linear(1, c)
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.temb((t.to(x.dtype) / T)[:, None])
        h = torch.tanh(self.conv_in(x) + emb[:, :, None, None])
        b, c, hh, ww = h.shape
        tok = h.flatten(2).transpose(1, 2)  # (B, HW, C): Linear with weight sharing
        att = torch.softmax(self.q(tok) @ self.k(tok).transpose(1, 2) / math.sqrt(c), dim=-1)
        h = h + (att @ self.v(tok)).transpose(1, 2).reshape(b, c, hh, ww)
        return self.conv_out(h)


def make(cls, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw).double()


def draws(n: int, s: int, shape=(1, 2, 2), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *shape, generator=g, dtype=F64)
    t = torch.randint(1, T + 1, (n, s), generator=g)
    eps = torch.randn(n, s, *shape, generator=g, dtype=F64)
    return x0, t, eps


# ---------------------------------------------------------------------------------------------
# brute force
# ---------------------------------------------------------------------------------------------


def _functional(model: nn.Module, params: list[Tensor]):
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def call(flat: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        d = {k: c.view(s) for k, c, s in zip(keys, flat.split(sizes), shapes, strict=True)}
        return torch.func.functional_call(model, d, (xt, t))

    flat0 = torch.cat([p.detach().flatten() for p in params])
    return call, flat0


def brute_ggn(model, params, x0, t, eps) -> Tensor:
    """2 / (R D) sum_r J_r^T J_r from the explicit Jacobian."""
    xt, tt, _ = noisy_rows(SCHEDULE, x0, t, eps)
    call, flat0 = _functional(model, params)
    J = torch.func.jacrev(lambda f: call(f, xt, tt).flatten())(flat0)  # (R*D, P)
    r, d = xt.shape[0], xt[0].numel()
    return 2.0 / (r * d) * J.T @ J


def brute_ef(model, params, x0, t, eps) -> Tensor:
    """D / R sum_r g_r g_r^T, g_r = grad of row r's per-pixel-mean squared error."""
    xt, tt, y = noisy_rows(SCHEDULE, x0, t, eps)
    call, flat0 = _functional(model, params)
    G = torch.func.jacrev(lambda f: (call(f, xt, tt).flatten(1) - y).pow(2).mean(1))(flat0)
    return G.T @ G * y.shape[1] / y.shape[0]


def block_diag_mask(kfac: KFAC) -> Tensor:
    mask = torch.zeros(kfac.num_params, kfac.num_params, dtype=torch.bool)
    for b in kfac.blocks:
        idx = b.flat_index().flatten()
        mask[idx[:, None], idx[None, :]] = True
    return mask


def layer_mask(kfac: KFAC) -> Tensor:
    """Same-layer mask (weight and bias of one layer together)."""
    mask = torch.zeros(kfac.num_params, kfac.num_params, dtype=torch.bool)
    for layer in kfac.layers:
        idx = torch.cat([b.flat_index().flatten() for b in kfac.blocks if b.layer == layer])
        mask[idx[:, None], idx[None, :]] = True
    return mask


def assert_close(a: Tensor, b: Tensor, rtol: float = 1e-10):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


def rel_fro(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


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
    assert_close(KFAC.from_operator(op, params).to_dense(), 4 * torch.outer(g, g))  # D = 4
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
# 5. matvec / inverse / curvlinops agreement
# ---------------------------------------------------------------------------------------------

CASES = [
    (LinearEps, (1, 2, 2), "mc", "expand", False),
    (MLPEps, (1, 2, 2), "empirical", "reduce", True),
    (ConvAttnEps, (1, 4, 4), "mc", "expand", True),
    (ConvAttnEps, (1, 4, 4), "mc", "reduce", False),
    (ConvAttnEps, (1, 4, 4), "empirical", "expand", False),
]


@pytest.mark.parametrize("cls,shape,fisher,approx,separate", CASES)
@pytest.mark.parametrize("ekfac", [False, True], ids=["kfac", "ekfac"])
def test_matvec_inverse_and_curvlinops(cls, shape, fisher, approx, separate, ekfac):
    model = make(cls)
    params = kfac_parameters(model)
    x0, t, eps = draws(3, 2, shape=shape, seed=1)
    kw = dict(fisher=fisher, kfac=approx, separate_weight_and_bias=separate, ekfac=ekfac)
    op = build_operator(model, params, SCHEDULE, x0, t, eps, batch_size=4, mc_seed=3, **kw)
    K = KFAC.from_operator(op, params)
    dense = K.to_dense()
    P = K.num_params
    V = torch.randn(3, P, dtype=F64, generator=torch.Generator().manual_seed(0))
    # KFAC.matvec == curvlinops operator @ v (operator columns are vectors)
    assert_close(K.matvec(V), (op @ V.T).T, rtol=1e-9)
    assert_close(K.matvec(V[0]), op @ V[0], rtol=1e-9)
    assert_close(K.matvec(V), V @ dense)
    assert_close(K.matvec(V, 0.3), V @ dense + 0.3 * V)
    assert torch.allclose(dense, dense.T, rtol=0, atol=1e-14 * float(dense.abs().max()))
    assert float(K.eigenvalues().min()) >= 0
    torch.testing.assert_close(
        K.eigenvalues().sort().values, torch.linalg.eigvalsh(dense), rtol=0, atol=1e-12
    )
    eye = torch.eye(P, dtype=F64)
    for lam in (1e-3, 1e-1, 10.0):
        X = K.inverse_apply(V, lam)
        assert_close(X, torch.linalg.solve(dense + lam * eye, V.T).T, rtol=1e-8)
        assert_close(K.matvec(X, lam), V, rtol=1e-10)
    # float32 in, float32 out; a vector in, a vector out
    assert K.inverse_apply(V[0].float(), 0.1).dtype == torch.float32
    assert K.inverse_apply(V[0], 0.1).shape == (P,)
    with pytest.raises(ValueError, match="flat parameter layout"):
        K.inverse_apply(V[:, :-1], 0.1)


def test_inverse_tiny_damping_full_rank():
    """lambda = 1e-8 on a full-rank K-FAC: residual of the exact eigen-inverse stays tiny."""
    model = make(LinearEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(8, 2, seed=2)
    K = fit_kfac(model, params, SCHEDULE, x0, t, eps, fisher="type2")
    assert float(K.eigenvalues().min()) > 1e-3  # A = mean a a^T of 16 rows in R^4: full rank
    V = torch.randn(2, K.num_params, dtype=F64)
    X = K.inverse_apply(V, 1e-8)
    assert rel_fro(K.matvec(X, 1e-8), V) < 1e-12
    D = DenseCurvature(K.to_dense())
    assert rel_fro(D.inverse_apply(V, 1e-8), X) < 1e-10
    assert_close(D.matvec(V, 0.5), K.matvec(V, 0.5))
    with pytest.raises(FloatingPointError):
        DenseCurvature(torch.zeros(3, 3, dtype=F64)).inverse_apply(torch.ones(3), 0.0)


def test_singular_without_damping_raises():
    model = make(LinearEps)
    params = kfac_parameters(model)
    K = fit_kfac(model, params, SCHEDULE, *draws(1, 1))  # rank-one A: singular
    with pytest.raises(FloatingPointError, match="singular"):
        K.inverse_apply(torch.ones(K.num_params, dtype=F64), 0.0)
    assert torch.isfinite(K.inverse_apply(torch.ones(K.num_params, dtype=F64), 1e-3)).all()


# ---------------------------------------------------------------------------------------------
# EK-FAC
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


@pytest.mark.parametrize("ekfac", [False, True])
def test_from_operator_reuses_computed_factors(ekfac):
    """curvlinops adds to existing factors on a second ``compute_kronecker_factors``; an
    operator whose factors already exist (here via its determinism check) is not refitted."""
    model = make(ConvAttnEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(2, 2, shape=(1, 4, 4))
    kw = dict(fisher="mc", ekfac=ekfac)
    op = build_operator(model, params, SCHEDULE, x0, t, eps, check_deterministic=True, **kw)
    K = KFAC.from_operator(op, params)
    ref = fit_kfac(model, params, SCHEDULE, x0, t, eps, backend="curvlinops", **kw)
    assert_close(K.to_dense(), ref.to_dense(), rtol=1e-9)


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
# 7. NaN, save / load, mismatches
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


@pytest.mark.parametrize("ekfac", [False, True])
def test_save_load_roundtrip(tmp_path, ekfac):
    model = make(ConvAttnEps)
    params = kfac_parameters(model)
    x0, t, eps = draws(3, 2, shape=(1, 4, 4))
    K = fit_kfac(model, params, SCHEDULE, x0, t, eps, ekfac=ekfac)
    path = tmp_path / "sub" / "kfac.pt"
    K.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["kfac.pt"]  # no temporary left
    state = torch.load(path, weights_only=True)
    assert state["meta"]["fisher"] == "mc" and state["meta"]["ekfac"] is ekfac
    L = KFAC.load(path, params)
    V = torch.randn(4, K.num_params, dtype=F64)
    for lam in (1e-8, 1e-2):
        assert torch.equal(L.inverse_apply(V, lam), K.inverse_apply(V, lam))
    assert L.layers == K.layers == ["conv_in", "temb", "q", "k", "v", "conv_out"]
    with pytest.raises(ValueError, match="parameter mismatch"):
        KFAC.load(path, kfac_parameters(make(ConvAttnEps, c=3)))
    with pytest.raises(ValueError, match="parameter mismatch"):
        KFAC.load(path, params[:-1])
    with pytest.raises(ValueError, match="flat parameter layout"):
        L.inverse_apply(torch.zeros(K.num_params + 1, dtype=F64), 1e-3)
    with pytest.raises(ValueError, match="not a"):
        KFAC.from_state_dict({"format": "something else"})


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


def test_tiny_digits_unet_smoke():
    torch.manual_seed(0)
    model = UNet(TINY_DIGITS)
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


def test_inverse_apply_sweep_equals_separate_calls():
    model = make(ConvAttnEps)
    params = kfac_parameters(model)
    K = fit_kfac(model, params, SCHEDULE, *draws(3, 2, shape=(1, 4, 4), seed=8))
    V = torch.randn(3, K.num_params, dtype=F64, generator=torch.Generator().manual_seed(1))
    sweep = K.inverse_apply_sweep(V, [1e-3, 1.0, 1e-3])
    assert list(sweep) == [1e-3, 1.0]
    for d, X in sweep.items():
        assert_close(X, K.inverse_apply(V, d), rtol=1e-12)
    dense = DenseCurvature(K.to_dense())
    for d, X in dense.inverse_apply_sweep(V, [1e-3, 1.0]).items():
        assert_close(X, K.inverse_apply(V, d), rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# 9. preconditioning on the device
# ---------------------------------------------------------------------------------------------


def _no_host_reads(monkeypatch) -> None:
    """Make every tensor -> Python scalar conversion (a device sync on a GPU) raise."""

    def fail(*_):
        raise AssertionError("a tensor was read on the host")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, fail)


def _check_on(K: KFAC, device: torch.device) -> None:
    for b in K.blocks:
        for name, x in b.tensors().items():
            if x is not None:
                assert x.device.type == device.type and x.dtype == F64, (b.layer, name)


@pytest.mark.parametrize("ekfac", [False, True])
def test_inverse_apply_on_an_explicit_device(monkeypatch, tmp_path, ekfac):
    """K-FAC moved to torch.device("cpu") keeps float64 factors there; inverse_apply and its
    sweep convert only the right-hand side and read nothing back to the host once the
    per-block eigenvalue minima are cached; Workspace.curvature returns it on ws.device."""
    from diffusion_attribution.pipeline.workspace import Workspace

    model = make(ConvAttnEps)
    params = kfac_parameters(model)
    K = fit_kfac(model, params, SCHEDULE, *draws(3, 2, shape=(1, 4, 4), seed=8), ekfac=ekfac)
    cpu = torch.device("cpu")
    Kd = K.to(cpu)
    assert Kd.device == cpu
    _check_on(Kd, cpu)
    V = torch.randn(3, K.num_params, dtype=torch.float32)
    ref = K.inverse_apply(V.double(), 1e-3)
    Kd.inverse_apply(V, 1e-3)  # caches the eigenvalue minima
    with monkeypatch.context() as m:
        _no_host_reads(m)
        X = Kd.inverse_apply(V, 1e-3)
        sweep = Kd.inverse_apply_sweep(V, [1e-3, 1e-1])
    assert X.dtype == torch.float32 and X.device == V.device
    assert rel_fro(X.double(), ref) < 1e-6  # float32 output of a float64 solve
    torch.testing.assert_close(sweep[1e-3], X, rtol=0, atol=0)
    _check_on(Kd, cpu)
    ws = Workspace(tmp_path, device="cpu")
    K.save(ws.out(ws.CURVATURE.format(variant="mc_expand")))
    L = ws.curvature("mc_expand")
    assert L.device == cpu
    _check_on(L, cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_inverse_apply_on_cuda_matches_cpu():
    model = make(ConvAttnEps)
    params = kfac_parameters(model)
    K = fit_kfac(model, params, SCHEDULE, *draws(3, 2, shape=(1, 4, 4), seed=8))
    gpu = torch.device("cuda")
    Kg = K.to(gpu)
    _check_on(Kg, gpu)
    V = torch.randn(4, K.num_params, dtype=F64)
    for lam in (1e-6, 1e-2):
        Xg = Kg.inverse_apply(V.to(gpu).float(), lam)
        assert Xg.device.type == "cuda" and Xg.dtype == torch.float32
        torch.testing.assert_close(Xg.cpu(), K.inverse_apply(V.float(), lam), rtol=1e-5, atol=1e-6)
        X64 = Kg.inverse_apply(V, lam)  # a CPU right-hand side comes back on the CPU
        assert X64.device.type == "cpu"
        assert rel_fro(X64, K.inverse_apply(V, lam)) < 1e-10
    Vg = V.to(gpu)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # no device->host syncs once minima are cached
    try:
        Kg.inverse_apply_sweep(Vg, [1e-6, 1e-2])
        Kg.inverse_apply(Vg.float(), 1e-2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
