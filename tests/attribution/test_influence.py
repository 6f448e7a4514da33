"""Influence scores (eq. 6): the score convention against exact retraining on a convex model,
the library's pipeline against brute force (explicit GGN, explicit inverse, autograd loops),
compression and determinism."""

import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

from diffusion_attribution.attribution.influence import (
    attribute,
    influence_scores,
    influence_specs,
    precondition,
    train_gradient_scale,
)
from diffusion_attribution.attribution.scores import ScoreKey
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.curvature.kfac import DenseCurvature
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import DiffusionLoss, TimestepLoss
from diffusion_attribution.diffusion.unet import kfac_parameters

F64 = torch.float64
SCHEDULE = NoiseSchedule.linear(20, 1e-3, 0.3)


class LinearEps(nn.Module):
    """eps_theta(x_t, t) = W vec(x_t) + b: the diffusion loss is quadratic in theta, so the GGN
    is the exact Hessian and exact retraining is a least-squares solve."""

    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d).double()

    def forward(self, x, t):
        return self.lin(x.flatten(1)).reshape(x.shape)


def rows(model_images, draws):
    """Design matrix [x_t, 1] and targets eps for the least-squares fit of LinearEps."""
    x0, t, eps = model_images, draws["t"], draws["eps"]
    ab = SCHEDULE.alpha_bars[t].to(F64)[..., None, None, None]
    xt = ab.sqrt() * x0[:, None] + (1 - ab).sqrt() * eps
    X = torch.cat([xt.flatten(2), torch.ones(*t.shape, 1, dtype=F64)], dim=2)
    return X.reshape(-1, X.shape[-1]), eps.flatten(2).reshape(-1, eps[0, 0].numel())


def fit_exact(model, X, Y):
    sol = torch.linalg.lstsq(X, Y).solution  # (d + 1, d)
    with torch.no_grad():
        model.lin.weight.copy_(sol[:-1].T)
        model.lin.bias.copy_(sol[-1])
    return model


def test_scores_predict_exact_retraining_on_a_convex_model():
    """score[q, j] ~ m(theta_{-j}, x_q) - m(theta, x_q), with no sign flip and the 1/N, 1/D
    factors of the influence module's docstring; K-FAC type-2 is exact for one Linear layer."""
    g = torch.Generator().manual_seed(0)
    n, s = 150, 8
    x0 = torch.randn(n, 1, 2, 2, generator=g, dtype=F64)
    queries = torch.randn(3, 1, 2, 2, generator=g, dtype=F64)
    loss = DiffusionLoss(SCHEDULE)
    draws = loss.draw(x0, torch.arange(n), s, seed=1)
    X, Y = rows(x0, draws)
    model = fit_exact(LinearEps(), X, Y)
    params = kfac_parameters(model)
    K = fit_kfac(model, params, SCHEDULE, x0, draws["t"], draws["eps"], fisher="type2")
    scores, _ = attribute(
        model,
        params,
        x0,
        queries,
        {"loss": loss},
        {"exact": K},
        [ScoreKey("kfac", "loss", "exact", 1e-12, "none")],
        train_measurement=loss,
        train_draws=s,
        query_draws=16,
        seed=1,
        batch_size=7,
    )
    score = scores[ScoreKey("kfac", "loss", "exact", 1e-12, "none")]
    qdraws = loss.draw(queries, torch.arange(3), 16, seed=2)  # attribute uses seed + 1
    with torch.no_grad():
        base = loss(model, queries, qdraws)
        actual = torch.zeros(3, n, dtype=F64)
        per_row = X.shape[0] // n
        for j in range(n):
            keep = torch.ones(X.shape[0], dtype=torch.bool)
            keep[j * per_row : (j + 1) * per_row] = False
            retrained = fit_exact(LinearEps(), X[keep], Y[keep])
            actual[:, j] = loss(retrained, queries, qdraws) - base
    for q in range(3):
        assert pearsonr(score[q].double(), actual[q]).statistic > 0.99
        slope = float((score[q].double() @ actual[q]) / (score[q].double() @ score[q].double()))
        assert 0.85 < slope < 1.2, slope  # removal of 1 of N: first order in 1/N


def autograd_gradient(model, params, measurement, x, draws, scale=1.0):
    value = scale * measurement(model, x[None], {k: v[None] for k, v in draws.items()})[0]
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])


def test_pipeline_equals_brute_force_with_explicit_inverse(tiny_unet):
    """attribute() with an explicit dense curvature equals (1/N) grad m^T (H + lambda I)^{-1}
    grad lbar computed with autograd loops and torch.linalg.inv."""
    model = tiny_unet.eval()
    params = kfac_parameters(model)
    g = torch.Generator().manual_seed(1)
    n, nq, s = 6, 2, 3
    x0 = torch.randn(n, 1, 4, 4, generator=g, dtype=F64)
    queries = torch.randn(nq, 1, 4, 4, generator=g, dtype=F64)
    P = sum(p.numel() for p in params)
    A = torch.randn(P, P, generator=g, dtype=F64) / P
    H = A @ A.T  # any PSD matrix stands in for the curvature
    lam = 1e-2
    loss, l5 = DiffusionLoss(SCHEDULE), TimestepLoss(SCHEDULE, 5)
    specs = [
        ScoreKey("kfac", "loss", "dense", lam, "none"),
        ScoreKey("kfac", "l_t=5", "dense", lam, "none"),
    ]
    scores, timings = attribute(
        model,
        params,
        x0,
        queries,
        {"loss": loss, "l_t=5": l5},
        {"dense": DenseCurvature(H)},
        specs,
        train_measurement=loss,
        train_draws=s,
        query_draws=4,
        seed=0,
        batch_size=4,
    )
    inv = torch.linalg.inv(H + lam * torch.eye(P, dtype=F64))
    td = loss.draw(x0, torch.arange(n), s, seed=0)
    Gt = torch.stack(
        [
            autograd_gradient(
                model,
                params,
                loss,
                x0[j],
                {k: v[j] for k, v in td.items()},
                train_gradient_scale(16),
            )
            for j in range(n)
        ]
    )
    for spec, m in zip(specs, (loss, l5), strict=True):
        qd = m.draw(queries, torch.arange(nq), 4, seed=1)
        Gq = torch.stack(
            [
                autograd_gradient(model, params, m, queries[q], {k: v[q] for k, v in qd.items()})
                for q in range(nq)
            ]
        )
        expected = Gq @ inv @ Gt.T / n
        torch.testing.assert_close(
            scores[spec].double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max())
        )
    assert timings.gradients > 0 and timings.overhead >= 0


def test_int8_keeps_the_ranking_and_runs_are_deterministic(tiny_unet):
    model = tiny_unet.eval()
    params = kfac_parameters(model)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(24, 1, 4, 4, generator=g, dtype=F64)
    queries = torch.randn(3, 1, 4, 4, generator=g, dtype=F64)
    loss = DiffusionLoss(SCHEDULE)
    d = loss.draw(x0, torch.arange(24), 2, seed=5)
    K = fit_kfac(model, params, SCHEDULE, x0, d["t"], d["eps"])
    specs = [ScoreKey("kfac", "loss", "mc", 1e-3, c) for c in ("none", "int8", "int4")]
    kw = dict(train_measurement=loss, train_draws=4, query_draws=4, seed=3, batch_size=8)
    a, _ = attribute(model, params, x0, queries, {"loss": loss}, {"mc": K}, specs, **kw)
    b, _ = attribute(model, params, x0, queries, {"loss": loss}, {"mc": K}, specs, **kw)
    for spec in specs:
        assert torch.equal(a[spec], b[spec])
    full, int8, int4 = (a[s] for s in specs)
    for q in range(3):
        assert spearmanr(full[q], int8[q]).statistic > 0.99
        assert spearmanr(full[q], int4[q]).statistic > 0.8
    assert not torch.equal(full, int8)


def test_scores_cover_every_training_example_once():
    pre = {"a": torch.ones(2, 3)}
    with pytest.raises(ValueError, match="covered 2 of 3"):
        influence_scores(pre, [(slice(0, 2), torch.ones(2, 3))], 3)
    out = influence_scores(
        pre, [(slice(0, 2), torch.ones(2, 3)), (slice(2, 3), 2 * torch.ones(1, 3))], 3
    )
    torch.testing.assert_close(out["a"], torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 2.0]]))  # 3 / N


def test_precondition_rejects_unknown_compression_and_nonfinite():
    D = DenseCurvature(torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="compression"):
        precondition(D, torch.ones(1, 3, dtype=F64), 1.0, "int2")
    torch.testing.assert_close(
        precondition(D, torch.ones(1, 3, dtype=F64), 1.0, "none"), torch.full((1, 3), 0.5)
    )


def test_scores_do_not_depend_on_how_training_gradients_are_chunked():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 7, generator=g)
    batches = [(slice(i, i + 2), torch.randn(2, 7, generator=g)) for i in range(0, 10, 2)]
    one = influence_scores({"q": q}, batches, 10, train_chunk_bytes=1)
    many = influence_scores({"q": q}, batches, 10, train_chunk_bytes=2**30, query_chunk=2)
    torch.testing.assert_close(one["q"], many["q"])
    torch.testing.assert_close(one["q"], q @ torch.cat([b for _, b in batches]).T / 10)


def test_influence_specs_sweep_every_variant_and_check_int8_for_each():
    variants = ("mc_expand", "mc_reduce", "empirical_expand", "empirical_reduce")
    specs = influence_specs(
        variants,
        ["loss", "elbo", "trajectory"],
        1e-8,
        "int8",
        damping_sweep=(1e-8, 1e-4, 1.0),
        compression_ablation=["none", "int4"],
        ablation_measurements=["loss", "elbo"],
    )
    assert len(specs) == len(set(specs))
    for v in variants:  # Fig. 4 at every damping of the sweep, for every variant
        for m in ("loss", "elbo"):
            assert {s.damping for s in specs if s.curvature == v and s.measurement == m} == {
                1e-8,
                1e-4,
                1.0,
            }
        # int8 and uncompressed at the fixed damping: the compression check of each variant
        assert {
            s.compression
            for s in specs
            if s.curvature == v and s.measurement == "loss" and s.damping == 1e-8
        } >= {"int8", "none"}
    # the other variants are not scored for measurements outside the ablation
    assert {s.curvature for s in specs if s.measurement == "trajectory"} == {"mc_expand"}
    assert {s.compression for s in specs if s.compression == "int4"} == {"int4"}
    assert all(s.curvature == "mc_expand" for s in specs if s.compression == "int4")
