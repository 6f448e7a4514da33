"""The curvature operators (:mod:`diffusion_attribution.curvature.kfac`): K-FAC / EK-FAC and the
dense oracle in the flat parameter layout -- ``matvec`` against curvlinops' own operator and
the dense matrix, exact damped inverses and their sweeps, save / load, the device the
factors live on, and the :class:`~diffusion_attribution.core.operators.InverseCurvature`
interface they offer to the attribution layer."""

from __future__ import annotations

import pytest
import torch

from diffusion_attribution.core.operators import InverseCurvature
from diffusion_attribution.curvature.curvlinops_backend import build_operator, kfac_from_operator
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.curvature.kfac import KFAC, DenseCurvature
from diffusion_attribution.diffusion.unet import kfac_parameters
from diffusion_attribution.pipeline.workspace import Workspace
from tests.curvature.oracles import (
    F64,
    SCHEDULE,
    ConvAttnEps,
    LinearEps,
    MLPEps,
    assert_close,
    draws,
    make,
    rel_fro,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# matvec / inverse / curvlinops agreement
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
    K = kfac_from_operator(op, params)
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


def test_operators_satisfy_inverse_curvature():
    """K-FAC and the dense oracle are what the attribution layer asks for."""
    model = make(LinearEps)
    K = fit_kfac(model, kfac_parameters(model), SCHEDULE, *draws(1, 1))
    assert isinstance(K, InverseCurvature)
    assert isinstance(DenseCurvature(K.to_dense()), InverseCurvature)


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# preconditioning on the device
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
    per-block eigenvalue minima are cached; saved in a workspace, it loads onto ws.device."""
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
    L = KFAC.load(ws.path(ws.CURVATURE.format(variant="mc_expand"))).to(ws.device)
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
