"""Denoising diffusion probabilistic models (Ho et al., 2020; paper Sec. 2.1).

Notation. Timesteps run t = 1..T; arrays indexed by t have length T + 1 and entry 0 stands
for "no noise" (alpha_bar_0 = 1). The paper writes the forward process with
lambda_t = sqrt(alpha_t) = sqrt(1 - beta_t), so that

    prod_{t'<=t} lambda_t'   = sqrt(alpha_bar_t),
    1 - prod_{t'<=t} lambda^2 = 1 - alpha_bar_t.

Forward marginal (eq. 1):   x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
Per-timestep loss (eq. 2):  l_t(theta, x_0) = E_eps ||eps - eps_theta(x_t, t)||^2,
diffusion loss:             l(theta, x_0)   = E_{t ~ U{1..T}} l_t(theta, x_0).

Every random quantity is passed in explicitly (``t``, ``eps``) or drawn from a
``torch.Generator`` so that the same seed gives the same numbers.

Any ``eps_model(x_t, t) -> eps`` mapping works (``EpsModel``): the library's
:class:`~diffusion_attribution.diffusion.unet.UNet`, diffusers' ``UNet2DModel`` wrapped to return its
``.sample``, or a toy module in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import tqdm.auto
from torch import Tensor

EpsModel = Callable[[Tensor, Tensor], Tensor]
"""Anything mapping noisy images ``x_t`` (B, C, H, W) and timesteps ``t`` (B,) to eps."""

Variance = Literal["fixed_large", "fixed_small"]


def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` on ``like``'s device and dtype, shaped (B, 1, 1, 1) to broadcast over images."""
    v = values.to(t.device)[t]
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.device, like.dtype)


@dataclass(frozen=True)
class NoiseSchedule:
    """Linear beta schedule of Ho et al. (2020) with all derived quantities in float64.

    ``betas[t]``, ``alphas[t] = 1 - betas[t]``, ``alpha_bars[t] = prod_{s<=t} alphas[s]``
    for t = 1..T; index 0 holds beta_0 = 0, alpha_bar_0 = 1.
    """

    betas: Tensor
    alphas: Tensor
    alpha_bars: Tensor

    @classmethod
    def linear(
        cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        """beta_t linearly spaced from ``beta_start`` (t = 1) to ``beta_end`` (t = T)."""
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        alphas = 1.0 - betas
        return cls(betas=betas, alphas=alphas, alpha_bars=torch.cumprod(alphas, 0))

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel() - 1

    def posterior_variance(self, t: Tensor) -> Tensor:
        """beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, variance of q(x_{t-1}|x_t,x_0)."""
        return (1 - self.alpha_bars[t - 1]) / (1 - self.alpha_bars[t]) * self.betas[t]

    def reverse_variance(self, t: Tensor, kind: Variance = "fixed_large") -> Tensor:
        """sigma_t^2 of p_theta(x_{t-1} | x_t): beta_t ("fixed_large") or beta~_t ("fixed_small").

        Ho et al. (2020) use beta_t for CIFAR-10. ``fixed_small`` is 0 at t = 1, where the last
        step is deterministic; the trajectory log-probability then needs ``fixed_large``.
        """
        if kind == "fixed_large":
            return self.betas[t]
        if kind == "fixed_small":
            return self.posterior_variance(t)
        raise ValueError(f"unknown variance {kind!r}; expected 'fixed_large' or 'fixed_small'")

    def elbo_weights(self, kind: Variance = "fixed_large") -> Tensor:
        """lambda_t with KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) = lambda_t ||eps - eps_theta||^2 + c.

        Ho et al. (2020), eq. 12: lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)),
        for t = 2..T (entry t of the returned (T + 1,) vector; entries 0 and 1 are 0 because
        t = 1 is the decoder term). Compare with the uniform weight 1/T of the loss (Fig. 16).
        """
        t = torch.arange(2, self.num_timesteps + 1)
        w = torch.zeros_like(self.betas)
        sigma2 = self.reverse_variance(t, kind)
        w[2:] = self.betas[t] ** 2 / (2 * sigma2 * self.alphas[t] * (1 - self.alpha_bars[t]))
        return w


def sample_timesteps(n: int, num_timesteps: int, generator: torch.Generator) -> Tensor:
    """t ~ Uniform{1, ..., T}, shape (n,), int64."""
    return torch.randint(1, num_timesteps + 1, (n,), generator=generator)


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Forward marginal q(x_t | x_0) reparameterised (eq. 1)."""
    ab = _at(schedule.alpha_bars, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def squared_error(
    eps_model: EpsModel, schedule: NoiseSchedule, x0: Tensor, t: Tensor, eps: Tensor
) -> Tensor:
    """||eps - eps_theta(x_t, t)||^2 for each row (summed over pixels), shape (B,).

    One Monte Carlo draw of l_t (eq. 2) for each (x0[i], t[i], eps[i]).
    """
    xt = q_sample(schedule, x0, t, eps)
    return (eps - eps_model(xt, t)).pow(2).flatten(1).sum(1)


def diffusion_loss(
    eps_model: EpsModel, schedule: NoiseSchedule, x0: Tensor, t: Tensor, eps: Tensor
) -> Tensor:
    """Monte Carlo estimate of l(theta, x_0) per example from given draws.

    ``x0``: (B, C, H, W); ``t``: (B, S) timesteps; ``eps``: (B, S, C, H, W) noise, S draws per
    example. Returns (B,): mean over the S draws of ||eps - eps_theta(x_t, t)||^2 (eq. 2). With
    all ``t`` equal to one value this is l_t; with t ~ U{1..T} it estimates l.
    """
    b, s = t.shape
    if eps.shape[:2] != (b, s) or eps.shape[2:] != x0.shape[1:]:
        raise ValueError(f"eps must have shape {(b, s, *x0.shape[1:])}, got {tuple(eps.shape)}")
    x0_rep = x0.unsqueeze(1).expand(b, s, *x0.shape[1:]).reshape(b * s, *x0.shape[1:])
    err = squared_error(
        eps_model, schedule, x0_rep, t.reshape(-1), eps.reshape(b * s, *x0.shape[1:])
    )
    return err.reshape(b, s).mean(1)


def draw_noise(
    n: int,
    num_draws: int,
    shape: tuple[int, ...],
    num_timesteps: int,
    seed: int,
    timestep: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Pre-draw (t, eps) for ``n`` examples x ``num_draws`` draws from one seed.

    Returns t (n, num_draws) int64 — uniform on 1..T, or all equal to ``timestep`` — and eps
    (n, num_draws, *shape) float32. The same seed gives the same draws, so a measurement can
    use common random numbers across models.
    """
    g = torch.Generator().manual_seed(seed)
    if timestep is None:
        t = sample_timesteps(n * num_draws, num_timesteps, g).reshape(n, num_draws)
    else:
        if not 1 <= timestep <= num_timesteps:
            raise ValueError(f"timestep must be in 1..{num_timesteps}, got {timestep}")
        t = torch.full((n, num_draws), timestep, dtype=torch.int64)
    eps = torch.randn((n, num_draws, *shape), generator=g)
    return t, eps


def q_posterior(
    schedule: NoiseSchedule, x0: Tensor, xt: Tensor, t: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7).

    mean = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
         + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t,
    variance = beta~_t (per example, shape (B,)).
    """
    s = schedule
    ab, ab_prev = s.alpha_bars, torch.cat([s.alpha_bars[:1], s.alpha_bars[:-1]])
    c0 = ab_prev.sqrt() * s.betas / (1 - ab).clamp_min(1e-300)
    ct = s.alphas.sqrt() * (1 - ab_prev) / (1 - ab).clamp_min(1e-300)
    variance = s.posterior_variance(t.cpu()).to(xt.device)
    return _at(c0, t, x0) * x0 + _at(ct, t, xt) * xt, variance


def p_mean(schedule: NoiseSchedule, xt: Tensor, t: Tensor, eps_pred: Tensor) -> Tensor:
    """Mean of p_theta(x_{t-1} | x_t): mu_{t-1|t,0}(x_t, eps_theta) (Sec. 2.1, Ho et al. eq. 11).

    mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t).
    """
    s = schedule
    coef = s.betas / (1 - s.alpha_bars).sqrt().clamp_min(1e-300)
    return (xt - _at(coef, t, xt) * eps_pred) / _at(s.alphas.sqrt(), t, xt)


def predicted_x0(schedule: NoiseSchedule, trajectory: Tensor, means: Tensor) -> Tensor:
    """The model's prediction of x_0 at every step of a recorded sampling trajectory, clipped
    to the data range [-1, 1] (as diffusers' DDPM scheduler does by default).

    ``trajectory`` and ``means`` are :class:`SampleResult`'s (T + 1, n, C, H, W) tensors. The
    noise prediction at step t is recovered from the recorded mean of p_theta(x_{t-1} | x_t)
    by inverting :func:`p_mean`, eps_hat = (x_t - sqrt(alpha_t) mu_t) sqrt(1 - alpha_bar_t) / beta_t,
    and x0_hat^t = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t) (eq. 1 solved for
    x_0), in float64; entry 0 is the sample itself. No model evaluation is needed.
    """
    if trajectory.shape != means.shape or trajectory.shape[0] != schedule.num_timesteps + 1:
        raise ValueError(
            f"trajectory and means must both be (T + 1, n, ...) with T = {schedule.num_timesteps}, "
            f"got {tuple(trajectory.shape)} and {tuple(means.shape)}"
        )
    s = schedule
    x, mu = trajectory.double(), means.double()
    view = (-1,) + (1,) * (x.ndim - 1)
    t = torch.arange(1, s.num_timesteps + 1)
    scale = ((1 - s.alpha_bars[t]).sqrt() / s.betas[t]).view(view)
    eps_hat = (x[1:] - s.alphas[t].sqrt().view(view) * mu[1:]) * scale
    x0_hat = (x[1:] - (1 - s.alpha_bars[t]).sqrt().view(view) * eps_hat) / s.alpha_bars[
        t
    ].sqrt().view(view)
    out = torch.cat([x[:1], x0_hat.clamp(-1.0, 1.0)])
    return out.to(trajectory.dtype)


@dataclass
class SampleResult:
    """Output of :func:`sample`.

    ``x0``: (n, C, H, W) final samples. If recorded: ``trajectory`` (T + 1, n, C, H, W) with
    ``trajectory[t] = x_t`` (so ``trajectory[T]`` is the initial noise and ``trajectory[0]``
    equals ``x0``), ``means`` (T + 1, n, C, H, W) with ``means[t]`` the mean of
    p_theta(x_{t-1} | x_t) used at step t (``means[0]`` unused, zero), and ``variances``
    (T + 1,) float64 with ``variances[t] = sigma_t^2``.
    """

    x0: Tensor
    trajectory: Tensor | None = None
    means: Tensor | None = None
    variances: Tensor | None = None


@torch.no_grad()
def sample(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    n: int,
    shape: tuple[int, ...],
    seed: int,
    *,
    variance: Variance = "fixed_large",
    batch_size: int | None = None,
    record_trajectory: bool = False,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> SampleResult:
    """Ancestral sampling x_T ~ N(0, I), x_{t-1} ~ p_theta(x_{t-1} | x_t) (Ho et al. Alg. 2).

    All noise comes from one generator seeded with ``seed`` and is drawn for the whole set of
    ``n`` samples at each step, so the result does not depend on ``batch_size`` (which only
    bounds how many images go through the model at once) nor on ``device`` (noise is drawn
    on the CPU). No noise is added at t = 1. Recorded tensors stay on the CPU.
    """
    T = schedule.num_timesteps
    bs = batch_size or n
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g).to(device)
    traj = torch.empty((T + 1, n, *shape)) if record_trajectory else None
    means = torch.zeros((T + 1, n, *shape)) if record_trajectory else None
    variances = schedule.reverse_variance(torch.arange(1, T + 1), variance)
    variances = torch.cat([torch.zeros(1, dtype=torch.float64), variances])
    if traj is not None:
        traj[T] = x.cpu()
    for t_int in tqdm.auto.tqdm(
        range(T, 0, -1), desc="sampling", disable=not progress, mininterval=2
    ):
        t = torch.full((n,), t_int, dtype=torch.int64, device=device)
        eps_pred = torch.cat([eps_model(x[i : i + bs], t[i : i + bs]) for i in range(0, n, bs)])
        mean = p_mean(schedule, x, t, eps_pred.to(x.dtype))
        if t_int > 1:
            noise = torch.randn((n, *shape), generator=g).to(device)
            x = mean + float(variances[t_int].sqrt()) * noise
        else:
            x = mean
        if traj is not None:
            traj[t_int - 1] = x.cpu()
            means[t_int] = mean.cpu()
    return SampleResult(
        x0=x.cpu(), trajectory=traj, means=means, variances=variances if record_trajectory else None
    )
