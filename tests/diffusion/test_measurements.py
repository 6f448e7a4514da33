"""Measurements (paper Sec. 3.3) against explicit loops and independent Gaussian computations."""

import math

import pytest
import torch
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from diffusion_attribution.diffusion.ddpm import (
    NoiseSchedule,
    p_mean,
    predicted_x0,
    q_posterior,
    q_sample,
    sample,
)
from diffusion_attribution.diffusion.likelihood import discretized_gaussian_log_likelihood, quantize
from diffusion_attribution.diffusion.measurements import (
    ELBO,
    DiffusionLoss,
    JourneyLoss,
    SquareNorm,
    TimestepLoss,
    TrajectoryLogProb,
    example_generator,
    make_measurement,
)

T = 20
SHAPE = (1, 2, 2)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T, 1e-4, 0.3)


class ToyEps(torch.nn.Module):
    """eps = A x + b * sin(t): linear in x with a time dependence (float64)."""

    def __init__(self, d=4, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(0.3 * torch.randn(d, d, generator=g, dtype=dtype))
        self.b = torch.nn.Parameter(0.5 * torch.randn(d, generator=g, dtype=dtype))

    def forward(self, x, t):
        flat = x.flatten(1)
        out = flat @ self.A.T + self.b * torch.sin(t.to(flat.dtype))[:, None]
        return out.reshape(x.shape)


def data(n=3, levels=256, seed=0):
    """Images on the ``levels`` grid, including both extreme values (edge bins)."""
    g = torch.Generator().manual_seed(seed)
    x = quantize(torch.rand(n, *SHAPE, generator=g, dtype=torch.float64) * 2 - 1, levels)
    x[0, 0, 0, 0], x[-1, 0, 1, 1] = -1.0, 1.0
    return x


def test_loss_and_timestep_loss_equal_loop_of_eq2(schedule):
    model, x0 = ToyEps(), data()
    for meas in (DiffusionLoss(schedule), TimestepLoss(schedule, 7)):
        draws = meas.draw(x0, torch.arange(3), 5, seed=1)
        if isinstance(meas, TimestepLoss):
            assert (draws["t"] == 7).all()
        expected = torch.zeros(3, dtype=torch.float64)
        for i in range(3):
            for s in range(5):
                t, eps = int(draws["t"][i, s]), draws["eps"][i, s]
                ab = schedule.alpha_bars[t]
                xt = ab.sqrt() * x0[i] + (1 - ab).sqrt() * eps  # eq. 1
                pred = model(xt[None], torch.tensor([t]))[0]
                expected[i] += ((eps - pred) ** 2).sum() / 5  # eq. 2
        torch.testing.assert_close(meas(model, x0, draws), expected)


def test_square_norm_equals_loop(schedule):
    model, x0 = ToyEps(), data()
    meas = SquareNorm(schedule)
    draws = meas.draw(x0, torch.arange(3), 4, seed=2)
    expected = torch.stack(
        [
            torch.stack(
                [
                    model(
                        q_sample(
                            schedule,
                            x0[i : i + 1],
                            draws["t"][i, s : s + 1],
                            draws["eps"][i, s : s + 1],
                        ),
                        draws["t"][i, s : s + 1],
                    )
                    .pow(2)
                    .sum()
                    for s in range(4)
                ]
            ).mean()
            for i in range(3)
        ]
    )
    torch.testing.assert_close(meas(model, x0, draws), expected)


def elbo_by_loop(schedule, model, x0, eps, variance, levels):
    """Ho et al.'s ELBO from Gaussian KLs (torch.distributions) and a per-pixel decoder loop."""
    b = x0.shape[0]
    if variance == "fixed_large":
        sigma2 = schedule.betas.clone()
    else:
        sigma2 = schedule.posterior_variance(torch.arange(T + 1).clamp(min=1))
        sigma2[1] = sigma2[2]  # Ho et al.'s clipped log-variance
    out = torch.zeros(b, dtype=torch.float64)
    ab_T = schedule.alpha_bars[T]
    delta = 1 / (levels - 1)
    for i in range(b):
        prior = kl_divergence(Normal(ab_T.sqrt() * x0[i], (1 - ab_T).sqrt()), Normal(0.0, 1.0))
        total = prior.sum()
        for t in range(1, T + 1):
            tt = torch.tensor([t])
            xt = q_sample(schedule, x0[i : i + 1], tt, eps[i : i + 1, t - 1])
            mu_p = p_mean(schedule, xt, tt, model(xt, tt))
            sigma = sigma2[t].sqrt()
            if t >= 2:
                mu_q, var_q = q_posterior(schedule, x0[i : i + 1], xt, tt)
                kl = kl_divergence(Normal(mu_q, var_q.sqrt()), Normal(mu_p, sigma))
                total = total + kl.sum()
            else:
                for v, m in zip(x0[i].flatten().tolist(), mu_p.flatten().tolist(), strict=True):
                    hi = math.inf if v > 1 - delta / 2 else v + delta
                    lo = -math.inf if v < -1 + delta / 2 else v - delta
                    p = norm.cdf((hi - m) / float(sigma)) - norm.cdf((lo - m) / float(sigma))
                    total = total - math.log(p)
        out[i] = -total
    return out


@pytest.mark.parametrize(("variance", "levels"), [("fixed_large", 256), ("fixed_small", 17)])
def test_elbo_exact_equals_gaussian_kl_loop(schedule, variance, levels):
    model, x0 = ToyEps(), data(levels=levels)
    eps = torch.randn(3, T, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    elbo = ELBO(schedule, variance=variance, levels=levels)
    expected = elbo_by_loop(schedule, model, x0, eps, variance, levels)
    torch.testing.assert_close(elbo.exact(model, x0, eps), expected, rtol=1e-9, atol=1e-9)


def test_elbo_of_perfect_eps_model_is_constants_only(schedule):
    """With eps_theta = eps exactly, every lambda_t term vanishes and the decoder mean is x_0."""
    x0 = data(n=1)
    ab = schedule.alpha_bars

    def oracle(xt, t):  # knows x0: inverts eq. 1
        a = ab[t].reshape(-1, 1, 1, 1)
        return (xt - a.sqrt() * x0) / (1 - a).sqrt()

    eps = torch.randn(1, T, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    d, sigma1 = x0.numel(), math.sqrt(schedule.betas[1])
    prior = 0.5 * (ab[T] * x0.pow(2) - ab[T] - torch.log1p(-ab[T])).sum()
    # fixed_small: sigma_t^2 = beta~_t, so the t >= 2 KLs are 0 exactly.
    elbo = ELBO(schedule, variance="fixed_small", levels=256)
    sigma1_small = math.sqrt(schedule.posterior_variance(torch.tensor(2)))
    dec = torch.tensor(
        [math.log(norm.cdf(1 / 255 / sigma1_small) - norm.cdf(-1 / 255 / sigma1_small))] * d
    )
    # x0 = -1 and x0 = 1 (pixels 0 and 3): edge bins (-inf, -1 + delta] and [1 - delta, inf)
    dec[[0, 3]] = math.log(norm.cdf(1 / 255 / sigma1_small))
    torch.testing.assert_close(elbo.exact(oracle, x0, eps), -(prior - dec.sum()).reshape(1))
    # fixed_large: only the Gaussian-KL constants C_t remain.
    elbo = ELBO(schedule, variance="fixed_large", levels=256)
    t = torch.arange(2, T + 1)
    post, beta = schedule.posterior_variance(t), schedule.betas[t]
    consts = d * 0.5 * (torch.log(beta / post) + post / beta - 1)
    dec = torch.tensor([math.log(norm.cdf(1 / 255 / sigma1) - norm.cdf(-1 / 255 / sigma1))] * d)
    dec[[0, 3]] = math.log(norm.cdf(1 / 255 / sigma1))
    expected = -(prior + consts.sum() - dec.sum())
    torch.testing.assert_close(elbo.exact(oracle, x0, eps), expected.reshape(1))


def test_elbo_mc_estimator_is_unbiased(schedule):
    """E[ELBO_hat] = E_eps[exact]: compare a big MC estimate with many exact sums."""
    model, x0 = ToyEps(), data(n=2)
    elbo = ELBO(schedule, levels=256)
    draws = elbo.draw(x0, torch.arange(2), 40000, seed=5)
    g = elbo.terms(model, x0, draws["t"], draws["eps"]) * T  # (2, S), mean = -(ELBO + L_T)
    mc, mc_se = g.mean(1), g.std(1) / math.sqrt(g.shape[1])
    eps = torch.randn(
        2, 2000, T, *SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64
    )
    exact = torch.stack([elbo.exact(model, x0, eps[:, k]) for k in range(2000)], 1)
    ex, ex_se = -exact.mean(1) - elbo.prior_kl(x0), exact.std(1) / math.sqrt(2000)
    z = (mc - ex) / (mc_se**2 + ex_se**2).sqrt()
    assert z.abs().max() < 4, z
    # And __call__ is exactly -(L_T + T * mean of the terms).
    torch.testing.assert_close(elbo(model, x0, draws), -(elbo.prior_kl(x0) + g.mean(1)))


def test_decoder_log_likelihood_is_stable_far_from_the_bin():
    x0 = torch.tensor([-1.0, -0.2, 0.0, 0.6, 1.0], dtype=torch.float64)
    for shift in (0.0, 0.05, -3.0):  # mean = x0 + shift; 3 is 300 standard deviations
        mean = (x0 + shift).requires_grad_()
        ll = discretized_gaussian_log_likelihood(x0, mean, 0.01, 256)
        (grad,) = torch.autograd.grad(ll.sum(), mean)
        assert torch.isfinite(ll).all() and torch.isfinite(grad).all()
        if shift != -3.0:  # scipy can still compare here
            for v, m, got in zip(x0.tolist(), mean.tolist(), ll.tolist(), strict=True):
                hi = math.inf if v == 1 else v + 1 / 255
                lo = -math.inf if v == -1 else v - 1 / 255
                want = math.log(norm.cdf((hi - m) / 0.01) - norm.cdf((lo - m) / 0.01))
                assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    # Far in the tail: the interior bin behaves like log phi at the nearer edge.
    ll = discretized_gaussian_log_likelihood(torch.tensor([0.0]), torch.tensor([3.0]), 0.01, 256)
    assert ll.item() == pytest.approx(norm.logcdf((1 / 255 - 3.0) / 0.01), rel=1e-3)


@pytest.fixture(scope="module")
def trajectory(schedule):
    model = ToyEps(dtype=torch.float32)
    res = sample(model, schedule, 3, SHAPE, seed=7, record_trajectory=True)
    return model, res


def test_trajectory_log_prob_exact_equals_normal_loop(schedule, trajectory):
    model, res = trajectory
    meas = TrajectoryLogProb(schedule)
    expected = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        lp = Normal(0.0, 1.0).log_prob(res.trajectory[T, i].double()).sum()
        for t in range(1, T + 1):
            # The mean and variance the sampler used at step t: an independent code path.
            step = Normal(res.means[t, i].double(), res.variances[t].sqrt())
            lp = lp + step.log_prob(res.trajectory[t - 1, i].double()).sum()
        expected[i] = lp
    got = meas.exact(model, res.trajectory).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    # The sampler adds no noise at t = 1, so that term is at its maximum -D/2 log(2 pi beta_1).
    t1 = meas.step_log_probs(
        model,
        torch.ones(3, 1, dtype=torch.long),
        res.trajectory[1, :, None],
        res.trajectory[0, :, None],
    )
    torch.testing.assert_close(
        t1[:, 0].double(),
        torch.full(
            (3,), -2 * math.log(2 * math.pi * float(schedule.betas[1])), dtype=torch.float64
        ),
        rtol=1e-5,
        atol=1e-3,
    )


def test_trajectory_mc_estimator_is_unbiased_and_indexes_the_trajectory(schedule, trajectory):
    model, res = trajectory
    meas = TrajectoryLogProb(schedule)
    draws = meas.draw(res.x0, torch.arange(3), 20000, seed=8, trajectories=res.trajectory)
    t = draws["t"]
    assert t.min() == 1 and t.max() == T
    for i, s in [(0, 0), (2, 17)]:
        torch.testing.assert_close(draws["x_t"][i, s], res.trajectory[t[i, s], i])
        torch.testing.assert_close(draws["x_prev"][i, s], res.trajectory[t[i, s] - 1, i])
    steps = T * meas.step_log_probs(model, t, draws["x_t"], draws["x_prev"]).double()
    exact = meas.exact(model, res.trajectory).double()
    z = (draws["log_prior"].double().mean(1) + steps.mean(1) - exact) / (
        steps.std(1) / math.sqrt(20000)
    )
    assert z.abs().max() < 4, z
    with pytest.raises(ValueError, match="trajectories"):
        meas.draw(res.x0, torch.arange(3), 4, seed=0)


@pytest.mark.parametrize("name", ["loss", "elbo", "square_norm", "l_t=3"])
def test_draws_depend_only_on_seed_and_index(schedule, name):
    meas = make_measurement(name, schedule)
    x0 = data(n=4)
    idx = torch.tensor([10, 11, 12, 13])
    full = meas.draw(x0, idx, 6, seed=9)
    part = meas.draw(x0[[2, 0]], idx[[2, 0]], 6, seed=9)  # other batch, other order
    for key in full:
        torch.testing.assert_close(part[key], full[key][[2, 0]], rtol=0, atol=0)
    other_seed = meas.draw(x0, idx, 6, seed=10)
    assert not torch.equal(other_seed["eps"], full["eps"])
    assert not torch.equal(full["eps"][0], full["eps"][1])  # examples get different streams
    assert full["eps"].dtype == x0.dtype and full["t"].dtype == torch.int64
    g1, g2 = example_generator(9, 10), example_generator(9, 10)
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))


def test_trajectory_draws_depend_only_on_seed_and_index(schedule, trajectory):
    _, res = trajectory
    meas = TrajectoryLogProb(schedule)
    full = meas.draw(res.x0, torch.tensor([0, 1, 2]), 5, seed=1, trajectories=res.trajectory)
    part = meas.draw(res.x0[2:], torch.tensor([2]), 5, seed=1, trajectories=res.trajectory[:, 2:])
    for key in full:
        torch.testing.assert_close(part[key], full[key][2:], rtol=0, atol=0)


def test_make_measurement(schedule):
    assert isinstance(make_measurement("loss", schedule), DiffusionLoss)
    elbo = make_measurement("elbo", schedule, levels=17, variance="fixed_small")
    assert isinstance(elbo, ELBO) and elbo.levels == 17 and elbo.variance == "fixed_small"
    assert isinstance(make_measurement("trajectory", schedule), TrajectoryLogProb)
    assert isinstance(make_measurement("square_norm", schedule), SquareNorm)
    lt = make_measurement("l_t=5", schedule)
    assert isinstance(lt, TimestepLoss) and lt.timestep == 5 and lt.name == "l_t=5"
    with pytest.raises(ValueError, match="valid names: loss, elbo"):
        make_measurement("likelihood", schedule)
    with pytest.raises(ValueError, match="bad timestep"):
        make_measurement("l_t=abc", schedule)
    with pytest.raises(ValueError, match=r"t must be in 1\.\.20"):
        make_measurement("l_t=21", schedule)
    with pytest.raises(ValueError, match="unknown variance"):
        make_measurement("elbo", schedule, variance="learned")
    with pytest.raises(ValueError, match="one index per example"):
        DiffusionLoss(schedule).draw(data(n=2), torch.arange(3), 4, seed=0)


def test_journey_loss_is_the_loss_at_the_trajectory_predictions(schedule, trajectory):
    """JourneyLoss: at each drawn step t, ||eps - eps_theta(q_sample(x0_hat^t, t, eps), t)||^2,
    averaged over the draws; the draws index the predicted-x_0 trajectory and depend only on
    (seed, index)."""
    model, res = trajectory
    x0_hat = predicted_x0(schedule, res.trajectory, res.means)
    meas = JourneyLoss(schedule)
    draws = meas.draw(res.x0, torch.arange(3), 5, seed=4, trajectories=x0_hat)
    assert set(draws) == {"t", "x0_hat", "eps"} and draws["t"].min() >= 1
    for i, s in [(0, 0), (2, 4)]:
        torch.testing.assert_close(draws["x0_hat"][i, s], x0_hat[draws["t"][i, s], i])
    want = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            for s in range(5):
                t = draws["t"][i, s : s + 1]
                eps = draws["eps"][i, s : s + 1]
                xt = q_sample(schedule, draws["x0_hat"][i, s : s + 1], t, eps)
                want[i] += float((eps - model(xt, t)).pow(2).sum()) / 5
        got = meas(model, res.x0, draws)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    part = meas.draw(res.x0[2:], torch.tensor([2]), 5, seed=4, trajectories=x0_hat[:, 2:])
    for key in draws:
        torch.testing.assert_close(part[key], draws[key][2:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="predicted-x_0 trajectories"):
        meas.draw(res.x0, torch.arange(3), 5, seed=4)
    assert isinstance(make_measurement("journey", schedule), JourneyLoss)
