"""DAS (Lin et al., 2025) against brute-force implementations of its formula, in float64:

score[q, j] = (1 / N) phi_q^T (Phi^T Phi / N + lambda I)^{-1} phi_j * e_j,
phi = grad E sum_pixels eps_theta(x_t, t) (training side / D),  e_j = sqrt(l(theta, x_j) / D).
"""

import copy

import pytest
import torch

from diffusion_attribution.attribution.baselines import baseline_scores
from diffusion_attribution.attribution.das import (
    OutputMean,
    das_scores_sweep,
    residual_weights,
)
from diffusion_attribution.attribution.projection import Projector
from diffusion_attribution.diffusion.ddpm import q_sample
from diffusion_attribution.diffusion.measurements import DiffusionLoss, make_measurement
from diffusion_attribution.diffusion.unet import kfac_parameters
from tests.attribution.test_trak import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def as64(draws):
    return {k: v.double() if v.is_floating_point() else v for k, v in draws.items()}


def brute_das(q, phi, e, damping):
    """The formula with an explicit float64 inverse of the k x k matrix."""
    q, phi, e = q.double(), phi.double(), e.double()
    n, k = phi.shape
    inv = torch.linalg.inv(phi.T @ phi / n + damping * torch.eye(k, dtype=torch.float64))
    return (q @ inv @ phi.T / n) * e


@pytest.mark.parametrize("n, k", [(9, 5), (4, 11)], ids=["N>k", "N<k"])
def test_das_scores_are_the_formula(n, k):
    """Both solve paths of the sweep (features' Gram or F) give the explicit formula."""
    g = torch.Generator().manual_seed(n * k)
    phi = torch.randn(n, k, generator=g, dtype=torch.float64)
    q = torch.randn(3, k, generator=g, dtype=torch.float64)
    e = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    found = das_scores_sweep(q, phi, e, [1e-2, 1.0])
    for damping, s in found.items():
        assert s.dtype == torch.float32 and s.shape == (3, n)
        assert rel_err(s, brute_das(q.float(), phi.float(), e, damping)) < 1e-5  # float32 inputs
    # the residual multiplies column j: e = 1 is the TRAK-form kernel, e = 2 doubles it
    ones = das_scores_sweep(q, phi, torch.ones(n, dtype=torch.float64), [1.0])[1.0]
    twos = das_scores_sweep(q, phi, torch.full((n,), 2.0, dtype=torch.float64), [1.0])[1.0]
    assert torch.allclose(twos, 2 * ones)
    with pytest.raises(ValueError, match="one residual per training example"):
        das_scores_sweep(q, phi, e[:-1], [1.0])


def test_output_mean_is_the_summed_predicted_noise(tiny):
    """f = mean over the drawn (t, eps) of sum_pixels eps_theta(x_t, t), one draw at a time."""
    model, _, schedule, x = tiny
    f = OutputMean(schedule)
    draws = f.draw(x, torch.arange(len(x)), 3, seed=4)
    values = f(model, x, draws)
    with torch.no_grad():
        for i in range(len(x)):
            terms = []
            for s in range(3):
                t = draws["t"][i, s : s + 1]
                xt = q_sample(schedule, x[i : i + 1], t, draws["eps"][i, s : s + 1])
                terms.append(model(xt, t).sum())
            assert float(values[i]) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="eps must have shape"):
        f(model, x, {"t": draws["t"], "eps": draws["eps"][:, :2]})


def test_residual_weights_are_rms_errors(tiny):
    """e_j = sqrt(l_j / D) at the training draws, batch size irrelevant."""
    model, _, schedule, x = tiny
    loss = DiffusionLoss(schedule)
    e = residual_weights(model, loss, x, draws=2, seed=7, batch_size=3)
    with torch.no_grad():
        direct = loss(model, x, loss.draw(x, torch.arange(len(x)), 2, 7)).double()
    assert e.dtype == torch.float64
    assert torch.allclose(e, (direct / x[0].numel()).sqrt(), rtol=1e-6)
    assert torch.allclose(e, residual_weights(model, loss, x, draws=2, seed=7, batch_size=7))


def test_das_in_the_baselines_is_its_formula_on_exact_gradients(tiny):
    """baseline_scores(das=True) on the tiny U-Net with the identity projection equals the
    formula on float64 gradients taken one example at a time (autograd, no batching), with
    the training side scaled by 1 / D and the RMS residuals of those examples' loss."""
    model, params, schedule, x = tiny
    queries = x[:3] * 0.9
    measurements = {n: make_measurement(n, schedule) for n in ("loss", "square_norm")}
    measurements["output_mean"] = OutputMean(schedule)
    num_params = sum(p.numel() for p in params)
    relative = [1e-2, 1.0]
    scores = baseline_scores(
        model, params, x, queries, measurements, Projector.identity(num_params), relative,
        query_measurements=["loss"], train_draws=2, query_draws=3, seed=7,
        precisions=("float32",), das=True, batch_size=3,
    )  # fmt: skip
    found = scores.find(method="das")
    assert len(found) == len(relative)
    assert {k.measurement for k in found} == {"output_mean"}
    assert {k.curvature for k in found} == {"projected_output_ggn"}
    assert sorted(scores.relative_damping(k) for k in found) == pytest.approx(relative)

    model64 = copy.deepcopy(model).double()
    params64 = kfac_parameters(model64)
    f, loss = OutputMean(schedule), DiffusionLoss(schedule)
    d = x[0].numel()

    def gradient(x0, index, draws, seed, scale):
        one = x0[None]  # drawn in float32 as the library draws, evaluated in float64
        drawn = as64(f.draw(one, torch.tensor([index]), draws, seed))
        value = f(model64, one.double(), drawn).sum() * scale
        return torch.cat([g.flatten() for g in torch.autograd.grad(value, params64)])

    phi = torch.stack([gradient(x[j], j, 2, 7, 1.0 / d) for j in range(len(x))])
    q = torch.stack([gradient(queries[i], i, 3, 8, 1.0) for i in range(len(queries))])
    with torch.no_grad():
        e = torch.stack(
            [
                loss(
                    model64,
                    x[j : j + 1].double(),
                    as64(loss.draw(x[j : j + 1], torch.tensor([j]), 2, 7)),
                )
                for j in range(len(x))
            ]
        ).reshape(-1)
    e = (e / d).sqrt()
    eig = float(phi.pow(2).sum() / phi.numel())
    assert scores.meta["mean_eigenvalue"]["das"] == pytest.approx(eig, rel=1e-4)
    for key, s in found.items():
        exact = brute_das(q, phi, e, key.damping)
        assert rel_err(s, exact) < 1e-5, key.label  # measured 9e-7 (float32 model and features)
    # the DAS matrices are not D-TRAK's: another output function and the residual weights
    (dkey,) = [k for k in scores.find(method="d-trak") if scores.relative_damping(k) == 1.0]
    (key,) = [k for k in found if scores.relative_damping(k) == pytest.approx(1.0)]
    assert rel_err(scores[key], scores[dkey]) > 1e-2
    # without das=True the set has no DAS matrix and needs no output_mean measurement
    del measurements["output_mean"]
    without = baseline_scores(
        model, params, x, queries, measurements, Projector(num_params, 16, seed=0), [1.0],
        query_measurements=["loss"], train_draws=1, query_draws=1, seed=0,
        precisions=("float32",),
    )  # fmt: skip
    assert not without.find(method="das")
    with pytest.raises(ValueError, match="output_mean"):
        baseline_scores(
            model, params, x, queries, measurements, Projector(num_params, 16, seed=0), [1.0],
            query_measurements=["loss"], train_draws=1, query_draws=1, seed=0, das=True,
        )  # fmt: skip
