"""DDPM schedule, forward process, loss and reverse step, checked by hand and against diffusers."""

import math

import pytest
import torch

from diffusion_attribution.diffusion.ddpm import (
    NoiseSchedule,
    diffusion_loss,
    draw_noise,
    p_mean,
    predicted_x0,
    q_posterior,
    q_sample,
    sample,
    squared_error,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(1000, 1e-4, 0.02)


def scheduler(variance_type, float64=False):
    s = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type=variance_type,
        clip_sample=False,
    )
    if float64:  # diffusers keeps its schedule in float32; recompute it in float64
        s.betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        s.alphas = 1.0 - s.betas
        s.alphas_cumprod = torch.cumprod(s.alphas, 0)
        s.one = torch.tensor(1.0, dtype=torch.float64)
    return s


class LinearEps(torch.nn.Module):
    """A toy eps-model with a time dependence: eps = A x + b * t / T."""

    def __init__(self, d=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(0.3 * torch.randn(d, d, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        flat = x.flatten(1)
        out = flat @ self.A.T + self.b * (t.to(flat.dtype)[:, None] / 1000)
        return out.reshape(x.shape)


def test_schedule_matches_diffusers(schedule):
    s = scheduler("fixed_large")
    # diffusers indexes timesteps 0..T-1; the library (and the paper) 1..T.
    torch.testing.assert_close(schedule.betas[1:], s.betas.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        schedule.alpha_bars[1:], s.alphas_cumprod.double(), rtol=1e-5, atol=1e-7
    )
    assert schedule.betas[1].item() == pytest.approx(1e-4)
    assert schedule.betas[1000].item() == pytest.approx(0.02)
    assert schedule.alpha_bars[0].item() == 1.0
    # Hand-worked: alpha_bar_2 = (1 - beta_1)(1 - beta_2), beta_2 = 1e-4 + 0.0199 / 999.
    beta2 = 1e-4 + (0.02 - 1e-4) / 999
    assert schedule.alpha_bars[2].item() == pytest.approx((1 - 1e-4) * (1 - beta2), rel=1e-12)
    # x_T is close to pure noise: sqrt(alpha_bar_T) ~ 6e-3.
    assert math.sqrt(schedule.alpha_bars[-1]) < 1e-2


def test_q_sample_matches_diffusers_add_noise(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 1, 4, 4, generator=g)
    eps = torch.randn(5, 1, 4, 4, generator=g)
    t = torch.tensor([1, 10, 250, 999, 1000])
    ours = q_sample(schedule, x0, t, eps)
    theirs = scheduler("fixed_large").add_noise(x0, eps, t - 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("t_int", [1, 2, 500, 1000])
def test_reverse_step_matches_diffusers(schedule, variance, t_int):
    g = torch.Generator().manual_seed(t_int)
    xt = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    eps_pred = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.full((3,), t_int)
    s = scheduler(variance, float64=True)
    s.set_timesteps(1000)
    mean = p_mean(schedule, xt, t, eps_pred)
    var = schedule.reverse_variance(t[:1], variance).item()
    # diffusers' step adds sqrt(var) * noise for t > 0 (its index); reproduce its noise draw.
    out = s.step(eps_pred, t_int - 1, xt, generator=torch.Generator().manual_seed(7)).prev_sample
    noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(7), dtype=xt.dtype)
    ours = mean + (math.sqrt(var) * noise if t_int > 1 else 0)
    torch.testing.assert_close(ours, out, rtol=1e-10, atol=1e-10)
    if t_int > 1:
        assert var == pytest.approx(s._get_variance(t_int - 1).item(), rel=1e-10)


def test_posterior_mean_is_reverse_mean_with_true_noise(schedule):
    """mu_{t-1|t,0}(x_t, eps) (Sec. 2.1) equals the q-posterior mean when eps is the true noise."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([2, 17, 400, 1000])
    xt = q_sample(schedule, x0, t, eps)
    mean_q, var_q = q_posterior(schedule, x0, xt, t)
    torch.testing.assert_close(p_mean(schedule, xt, t, eps), mean_q, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var_q, schedule.posterior_variance(t))
    assert torch.all(var_q < schedule.betas[t])


def test_loss_is_mean_of_squared_errors(schedule):
    model = LinearEps(d=4)
    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t, eps = draw_noise(3, 5, (1, 2, 2), 1000, seed=0)
    eps = eps.double()
    loss = diffusion_loss(model, schedule, x0, t, eps)
    # Autograd-free loop, eq. 2 written out.
    for i in range(3):
        errs = []
        for j in range(5):
            ab = schedule.alpha_bars[t[i, j]]
            xt = ab.sqrt() * x0[i] + (1 - ab).sqrt() * eps[i, j]
            pred = model(xt[None], t[i, j : j + 1])[0]
            errs.append(((eps[i, j] - pred) ** 2).sum())
        assert loss[i].item() == pytest.approx(torch.stack(errs).mean().item(), rel=1e-12)
    one = squared_error(model, schedule, x0, t[:, 0], eps[:, 0])
    assert one.shape == (3,)


def test_draw_noise_is_seeded():
    a = draw_noise(4, 3, (1, 2, 2), 1000, seed=5)
    b = draw_noise(4, 3, (1, 2, 2), 1000, seed=5)
    c = draw_noise(4, 3, (1, 2, 2), 1000, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    t, _ = draw_noise(2, 3, (1,), 1000, seed=0, timestep=250)
    assert torch.all(t == 250)
    assert a[0].min() >= 1 and a[0].max() <= 1000
    with pytest.raises(ValueError, match="timestep"):
        draw_noise(2, 3, (1,), 1000, seed=0, timestep=0)


def test_elbo_weights_hand_worked(schedule):
    w = schedule.elbo_weights("fixed_large")
    t = 10
    b, a, ab = schedule.betas[t], schedule.alphas[t], schedule.alpha_bars[t]
    assert w[t].item() == pytest.approx((b / (2 * a * (1 - ab))).item(), rel=1e-12)
    assert w[0] == 0 and w[1] == 0


def test_sampling_trajectory_and_determinism():
    sched = NoiseSchedule.linear(50, 1e-3, 0.2)
    model = LinearEps(d=4).float()
    r1 = sample(model, sched, 6, (1, 2, 2), seed=3, record_trajectory=True)
    r2 = sample(model, sched, 6, (1, 2, 2), seed=3, batch_size=4, record_trajectory=True)
    r3 = sample(model, sched, 6, (1, 2, 2), seed=4)
    torch.testing.assert_close(r1.x0, r2.x0)  # batch size does not change the samples
    assert not torch.allclose(r1.x0, r3.x0)
    assert r1.trajectory.shape == (51, 6, 1, 2, 2)
    torch.testing.assert_close(r1.trajectory[0], r1.x0)
    # Each recorded step: x_{t-1} = mean_t + sigma_t * z with z standard normal, and the
    # recorded mean is the model's p_mean at x_t.
    for t_int in (50, 20, 2):
        t = torch.full((6,), t_int)
        with torch.no_grad():
            mean = p_mean(sched, r1.trajectory[t_int], t, model(r1.trajectory[t_int], t))
        torch.testing.assert_close(r1.means[t_int], mean)
        assert r1.variances[t_int].item() == pytest.approx(sched.betas[t_int].item())
    torch.testing.assert_close(r1.trajectory[0], r1.means[1])  # no noise at the last step


def test_predicted_x0_inverts_the_recorded_means():
    """x0_hat^t from (x_t, mu_t) equals the model's own prediction (x_t - sqrt(1 - abar_t)
    eps_theta(x_t, t)) / sqrt(abar_t), clipped to [-1, 1]; entry 0 is the sample."""
    sched = NoiseSchedule.linear(50, 1e-3, 0.2)
    model = LinearEps(d=4).float()
    res = sample(model, sched, 6, (1, 2, 2), seed=3, record_trajectory=True)
    got = predicted_x0(sched, res.trajectory, res.means)
    assert got.shape == res.trajectory.shape and got.dtype == res.trajectory.dtype
    torch.testing.assert_close(got[0], res.x0)
    for t_int in (50, 20, 1):
        t = torch.full((6,), t_int)
        x = res.trajectory[t_int].double()
        with torch.no_grad():
            eps = model.double()(x, t)
        model.float()
        ab = sched.alpha_bars[t_int]
        want = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        torch.testing.assert_close(got[t_int].double(), want, rtol=1e-4, atol=1e-4)
    assert got[1:].abs().max() <= 1.0  # the predictions are clipped, the sample is not
    with pytest.raises(ValueError, match="T \\+ 1"):
        predicted_x0(sched, res.trajectory[1:], res.means[1:])
