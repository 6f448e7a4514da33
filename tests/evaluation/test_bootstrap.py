"""The paired bootstrap of Observations 1 and 2 and the approximate LDS ceiling: point estimates
against independent computations with the library's LDS functions, intervals on synthetic
cases whose answer is known."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from diffusion_attribution.evaluation.bootstrap import (
    grid_indices,
    observation1_bootstrap,
    observation2_bootstrap,
    spearman_rows,
)
from diffusion_attribution.evaluation.lds import (
    ceiling_exceedance,
    ceiling_per_sample,
    lds,
    lds_upper_bound,
    retraining_proxy,
)


def test_spearman_rows_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(7, 12)).astype(float)  # many ties, as resampled subsets have
    b = rng.normal(size=(7, 12))
    want = [spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(spearman_rows(a, b), want, atol=1e-12)
    assert np.isnan(spearman_rows(np.ones((1, 5)), b[:1, :5])).all()  # constant row


def test_grid_indices_are_seeded_and_in_range():
    q, m = grid_indices(5, 9, resamples=20, seed=3)
    q2, m2 = grid_indices(5, 9, resamples=20, seed=3)
    assert q.shape == (20, 5) and m.shape == (20, 9)
    assert (q == q2).all() and (m == m2).all()
    assert q.max() < 5 and m.max() < 9 and q.min() >= 0


def world(Q=16, M=24, K=3, seed=0, later_helps=True):
    """l_t at three timesteps; the influence prediction of l_t' carries the truth of every l_t
    (later ones with less noise when ``later_helps``); retraining's l_t are independent across
    timesteps apart from a shared signal."""
    g = torch.Generator().manual_seed(seed)
    names = ["l_t=10", "l_t=100", "l_t=500"]
    truth = torch.randn(Q, M, generator=g, dtype=torch.float64)
    measured = {
        n: truth[..., None] + 0.5 * torch.randn(Q, M, K, generator=g, dtype=torch.float64)
        for n in names
    }
    noise = [2.0, 1.0, 0.3] if later_helps else [1.0, 1.0, 1.0]
    predicted = {
        n: truth + s * torch.randn(Q, M, generator=g, dtype=torch.float64)
        for n, s in zip(names, noise, strict=True)
    }
    return names, predicted, measured


def test_observation1_point_estimates_match_the_lds_functions():
    names, pred, meas = world()
    got = observation1_bootstrap(pred, meas, names, resamples=10)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    infl = np.mean([lds(pred[b], meas[a]).mean - lds(pred[a], meas[a]).mean for a, b in pairs])
    retr = np.mean(
        [
            retraining_proxy(meas[b], meas[a]).mean - retraining_proxy(meas[a], meas[a]).mean
            for a, b in pairs
        ]
    )
    assert got["influence"].estimate == pytest.approx(infl, abs=1e-10)
    assert got["retraining"].estimate == pytest.approx(retr, abs=1e-10)
    assert got["difference"].estimate == pytest.approx(infl - retr, abs=1e-10)


def test_observation1_interval_finds_the_advantage_and_not_a_null():
    names, pred, meas = world(later_helps=True)
    d = observation1_bootstrap(pred, meas, names, resamples=200)["difference"]
    assert d.low > 0 and d.low <= d.estimate <= d.high
    names, pred, meas = world(later_helps=False, seed=1)
    d = observation1_bootstrap(pred, meas, names, resamples=200)["difference"]
    assert d.low < 0 < d.high


def test_observation2_fractions_and_intervals():
    g = torch.Generator().manual_seed(0)
    actual = 0.5 + torch.rand(20, 30, generator=g)  # always an increase
    predicted = torch.randn(20, 30, generator=g)  # about half
    got = observation2_bootstrap(predicted, actual, resamples=200)
    assert got["actual_increase"].estimate == 1.0
    assert (got["actual_increase"].low, got["actual_increase"].high) == (1.0, 1.0)
    p = float((predicted > 0).double().mean())
    assert got["predicted_increase"].estimate == pytest.approx(p)
    assert got["gap"].estimate == pytest.approx(1.0 - p)
    assert got["gap"].low > 0.3 and got["gap"].high < 0.7
    with pytest.raises(ValueError, match="Q, M"):
        observation2_bootstrap(predicted, actual[:, :5])


def test_ceiling_per_sample_pools_to_the_bound_and_varies():
    g = torch.Generator().manual_seed(0)
    T = torch.randn(40, 30, 1, generator=g, dtype=torch.float64)
    Y = T + 0.7 * torch.randn(40, 30, 3, generator=g, dtype=torch.float64)
    per = ceiling_per_sample(Y)
    assert per.shape == (40,) and np.isfinite(per).all()
    assert per.std() > 0.01  # one sample's 30 subsets give a noisy estimate
    # Jensen: the mean of the per-sample roots is below the root of the pooled correlation
    assert per.mean() <= lds_upper_bound(Y).mean + 0.01


def test_ceiling_exceedance_is_small_for_many_subsets_and_larger_for_few():
    g = torch.Generator().manual_seed(1)
    shape = lambda M: torch.randn(16, M, 3, generator=g, dtype=torch.float64)  # noqa: E731
    many = ceiling_exceedance(shape(64), runs=40, seed=0)
    few = ceiling_exceedance(shape(8), runs=40, seed=0)
    # a perfect predictor sits near the ceiling on average when M is large ...
    assert abs(many["realised"] - many["ceiling"]) < 0.05
    # ... and a small grid lets single samples (and whole runs) exceed it further
    assert few["excess_p95"] > many["excess_p95"]
    assert 0 <= few["fraction_runs_above"] <= 1
    assert few["fraction_samples_above_own"] > 0.1
