"""Measurement functions m(theta, x) whose change under retraining is attributed (paper Sec. 3.3).

Every measurement is a Monte Carlo average over randomness that is drawn *before* it is
evaluated: ``Measurement.draw`` returns a dict of tensors with leading dims (B, S) (B examples,
S draws each), and ``measurement(eps_model, x0, draws)`` returns the (B,) values. Keeping the
draws fixed makes the measurement a deterministic function of theta, so

* the same draws can be reused for every retrained model (common random numbers: differences
  between models are not drowned in Monte Carlo noise), and
* its gradient is well defined (K-FAC's ``check_deterministic`` and our per-example gradients
  in :mod:`diffusion_attribution.diffusion.gradients` need that).

Seeding. The draws for example ``i`` come from its own ``torch.Generator`` seeded from
``(seed, index_i)`` (:func:`example_generator`), where ``index_i`` is the example's *global*
id. They therefore do not depend on how the examples are batched, and the same
``(seed, index, num_draws)`` gives the same draws for every model and every measurement that
draws the same kind of randomness (t, then eps).

Calling convention (batched). ``x0`` is (B, C, H, W) and every tensor in ``draws`` has
leading dims (B, S). The measurement calls ``eps_model(x_t, t)`` on rows in *example-major*
order: a call with R rows gives rows ``i * R/B .. (i+1) * R/B - 1`` to example ``i`` (this
is what reshaping (B, S, ...) to (B*S, ...) does). The value is affine in the mean over draws,
``m = c(x0) + mean_s f_s``, so a mean over draw chunks weighted by chunk size equals the
value on all draws. Both facts are used by :mod:`diffusion_attribution.diffusion.gradients`; a single
example is the batch B = 1 (which is how ``torch.func.vmap`` calls it).

Measurements (Sec. 3.3 and Zheng et al., 2024):

* :class:`DiffusionLoss` -- l(theta, x) = E_t E_eps ||eps - eps_theta(x_t, t)||^2 (eq. 2).
* :class:`TimestepLoss` -- l_t(theta, x) for one t (eq. 2).
* :class:`ELBO` -- Ho et al. (2020)'s evidence lower bound on log p_theta(x), in nats.
* :class:`TrajectoryLogProb` -- log p_theta(x_{0:T}) of a recorded sampling trajectory.
* :class:`SquareNorm` -- E ||eps_theta(x_t, t)||^2, D-TRAK's substitute "measurement".

:func:`make_measurement` builds one from a name such as ``"loss"`` or ``"l_t=250"``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from diffusion_attribution.diffusion.ddpm import EpsModel, NoiseSchedule, Variance, p_mean, q_sample
from diffusion_attribution.diffusion.likelihood import discretized_gaussian_log_likelihood

__all__ = [
    "DiffusionLoss",
    "ELBO",
    "JourneyLoss",
    "Measurement",
    "SquareNorm",
    "TimestepLoss",
    "TrajectoryLogProb",
    "example_generator",
    "make_measurement",
    "MEASUREMENT_NAMES",
]


def example_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for example ``index`` under ``seed``, independent of every other pair.

    The 64-bit seed is derived with NumPy's ``SeedSequence([seed, index])`` (a hash designed
    for this), so nearby ``(seed, index)`` pairs give unrelated streams.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def _take(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``table[t]`` (float64 table, integer ``t``) in ``like``'s dtype and device."""
    return table.to(t.device)[t].to(like.dtype)


def _flat_rows(x0: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Example-major rows: x0 (B, ...) repeated S times, t (B, S) and eps (B, S, ...) flattened."""
    b, s = t.shape
    shape = x0.shape[1:]
    if eps.shape[:2] != (b, s) or eps.shape[2:] != shape:
        raise ValueError(f"eps must have shape {(b, s, *shape)}, got {tuple(eps.shape)}")
    x0_rows = x0.unsqueeze(1).expand(b, s, *shape).reshape(b * s, *shape)
    return x0_rows, t.reshape(b * s), eps.reshape(b * s, *shape)


def _sum_pixels(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


def reverse_variances(schedule: NoiseSchedule, kind: Variance) -> Tensor:
    """sigma_t^2 of p_theta(x_{t-1} | x_t) for t = 0..T (entry 0 unused), float64.

    ``fixed_large``: beta_t. ``fixed_small``: beta~_t, which is 0 at t = 1; as in Ho et al.'s
    code (``posterior_log_variance_clipped``) sigma_1^2 is then replaced by beta~_2, so the
    decoder and the trajectory density stay proper.
    """
    T = schedule.num_timesteps
    var = torch.zeros(T + 1, dtype=torch.float64)
    var[1:] = schedule.reverse_variance(torch.arange(1, T + 1), kind)
    if kind == "fixed_small":
        if T < 2:
            raise ValueError(
                "variance='fixed_small' needs T >= 2 (sigma_1^2 is clipped to beta~_2)"
            )
        var[1] = var[2]
    return var


class Measurement(ABC):
    """A measurement m(theta, x) estimated from pre-drawn randomness (module docstring).

    Subclasses set ``name`` and implement ``__call__``; the default ``draw`` pre-draws, for
    each example, S timesteps (uniform on 1..T, or all equal to ``self.timestep``) and then S
    standard-normal noise images from the example's own generator.
    """

    name: str = "measurement"
    timestep: int | None = None  # fixed t for every draw, or None for t ~ U{1..T}

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, T={self.num_timesteps})"

    def draw(
        self,
        x0: Tensor,
        indices: Tensor,
        num_draws: int,
        seed: int,
        trajectories: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Pre-draw the randomness for examples ``x0`` (B, C, H, W) with global ids ``indices``.

        Returns ``{"t": (B, S) int64, "eps": (B, S, C, H, W) in x0's dtype}``; example ``i``'s
        draws depend only on ``(seed, indices[i], num_draws)``.
        """
        indices = self._check(x0, indices, num_draws)
        ts, epss = [], []
        for index in indices.tolist():
            g = example_generator(seed, index)
            if self.timestep is None:
                t = torch.randint(1, self.num_timesteps + 1, (num_draws,), generator=g)
            else:
                t = torch.full((num_draws,), self.timestep, dtype=torch.int64)
            ts.append(t)
            epss.append(torch.randn((num_draws, *x0.shape[1:]), generator=g, dtype=x0.dtype))
        return {"t": torch.stack(ts), "eps": torch.stack(epss).to(x0.device)}

    @staticmethod
    def _check(x0: Tensor, indices: Tensor, num_draws: int) -> Tensor:
        indices = torch.as_tensor(indices).reshape(-1)
        if indices.numel() != x0.shape[0]:
            raise ValueError(f"need one index per example: {indices.numel()} != {x0.shape[0]}")
        if num_draws < 1:
            raise ValueError(f"num_draws must be >= 1, got {num_draws}")
        return indices

    @abstractmethod
    def __call__(self, eps_model: EpsModel, x0: Tensor, draws: dict[str, Tensor]) -> Tensor:
        """Values (B,) of the measurement for examples ``x0`` (B, C, H, W) from ``draws``."""


class DiffusionLoss(Measurement):
    """The diffusion (training) loss l(theta, x) = E_{t ~ U{1..T}} l_t(theta, x) (Sec. 2.1).

    l_t(theta, x) = E_eps ||eps - eps_theta(x_t, t)||^2 (eq. 2), summed over pixels, with
    x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps (eq. 1). Estimate: the mean over the
    S drawn (t, eps) pairs.
    """

    name = "loss"

    def __call__(self, eps_model: EpsModel, x0: Tensor, draws: dict[str, Tensor]) -> Tensor:
        t, eps = draws["t"], draws["eps"]
        x0_rows, t_rows, eps_rows = _flat_rows(x0, t, eps)
        xt = q_sample(self.schedule, x0_rows, t_rows, eps_rows)
        err = _sum_pixels((eps_rows - eps_model(xt, t_rows)).pow(2))
        return err.reshape(t.shape).mean(1)


class TimestepLoss(DiffusionLoss):
    """The per-timestep loss l_t(theta, x) of eq. 2 for one fixed ``t`` (paper Sec. 4.1)."""

    def __init__(self, schedule: NoiseSchedule, t: int):
        super().__init__(schedule)
        if not 1 <= int(t) <= schedule.num_timesteps:
            raise ValueError(f"t must be in 1..{schedule.num_timesteps}, got {t}")
        self.timestep = int(t)
        self.name = f"l_t={self.timestep}"


class SquareNorm(Measurement):
    """E_t E_eps ||eps_theta(x_t, t)||^2, t ~ U{1..T}: D-TRAK's "square" function.

    Zheng et al. (2024) found that this substitute for the loss in the query *and* training
    gradients improves LDS; it is not a property of the sample's probability.
    """

    name = "square_norm"

    def __call__(self, eps_model: EpsModel, x0: Tensor, draws: dict[str, Tensor]) -> Tensor:
        t, eps = draws["t"], draws["eps"]
        x0_rows, t_rows, eps_rows = _flat_rows(x0, t, eps)
        xt = q_sample(self.schedule, x0_rows, t_rows, eps_rows)
        return _sum_pixels(eps_model(xt, t_rows).pow(2)).reshape(t.shape).mean(1)


class ELBO(Measurement):
    """The evidence lower bound of Ho et al. (2020, eq. 5) on log p_theta(x_0), in nats.

    ELBO(theta, x_0) = -[L_T + sum_{t=2}^T L_{t-1} + L_0] <= log p_theta(x_0) with

    * L_T = KL(q(x_T | x_0) || N(0, I)) = 1/2 sum_pixels(abar_T x_0^2 - abar_T - log(1 - abar_T)),
      exact and independent of theta;
    * L_{t-1} = E_{x_t} KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))
      = E_eps [lambda_t ||eps - eps_theta(x_t, t)||^2] + C_t   (Ho et al. eqs. 8-12), with
      lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) and the Gaussian-KL constant
      C_t = D/2 (log(sigma_t^2 / beta~_t) + beta~_t / sigma_t^2 - 1) (D pixels; 0 when
      sigma_t^2 = beta~_t), both exact so the value is a real bound;
    * L_0 = -E_{x_1} log p_theta(x_0 | x_1), the discretised Gaussian decoder of Ho et al.
      eq. 13 over ``levels`` values in [-1, 1] with mean mu_theta(x_1, 1) and variance
      sigma_1^2 (:func:`discretized_gaussian_log_likelihood`). ``x0`` should lie on that grid
      (see :func:`~diffusion_attribution.diffusion.likelihood.quantize`).

    Writing g_t(eps) for the integrand of L_{t-1} (t >= 2) or of L_0 (t = 1), the
    estimator from S draws (t_s, eps_s), t_s ~ U{1..T}, is

        ELBO_hat = -[L_T + T/S sum_s g_{t_s}(eps_s)],

    which is unbiased because E_t[T g_t] = sum_{t=1}^T g_t. :meth:`exact` gives the full sum
    over all t for given noise (one eps per t), for tests.
    """

    name = "elbo"

    def __init__(
        self, schedule: NoiseSchedule, variance: Variance = "fixed_large", levels: int = 256
    ):
        super().__init__(schedule)
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.variance, self.levels = variance, int(levels)
        T = schedule.num_timesteps
        self.sigma2 = reverse_variances(schedule, variance)  # (T + 1,)
        t = torch.arange(2, T + 1)
        self.weights = torch.zeros(T + 1, dtype=torch.float64)  # lambda_t, 0 at t = 0, 1
        self.kl_const = torch.zeros(T + 1, dtype=torch.float64)  # C_t / D per pixel
        if T >= 2:
            s = schedule
            post = s.posterior_variance(t)
            sig = self.sigma2[2:]
            self.weights[2:] = s.betas[t] ** 2 / (2 * sig * s.alphas[t] * (1 - s.alpha_bars[t]))
            self.kl_const[2:] = 0.5 * (torch.log(sig / post) + post / sig - 1)

    def prior_kl(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per example, (B,)."""
        ab = float(self.schedule.alpha_bars[-1])
        return 0.5 * _sum_pixels(ab * x0.pow(2) - ab - math.log1p(-ab))

    def terms(self, eps_model: EpsModel, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """g_t(eps) of the class docstring for each draw: (B, S) from t (B, S), eps (B, S, ...)."""
        x0_rows, t_rows, eps_rows = _flat_rows(x0, t, eps)
        xt = q_sample(self.schedule, x0_rows, t_rows, eps_rows)
        pred = eps_model(xt, t_rows)
        # t >= 2: lambda_t ||eps - eps_theta||^2 + C_t (lambda_1 = C_1 = 0).
        num_pixels = x0[0].numel()
        kl = _take(self.weights, t_rows, xt) * _sum_pixels((eps_rows - pred).pow(2))
        kl = kl + num_pixels * _take(self.kl_const, t_rows, xt)
        # t = 1: -log p_theta(x_0 | x_1). Rows with t != 1 get a harmless mean (x_0 itself).
        first = (t_rows == 1).reshape(-1, *([1] * (xt.dim() - 1)))
        mean = torch.where(first, p_mean(self.schedule, xt, t_rows, pred), x0_rows)
        std = math.sqrt(float(self.sigma2[1]))
        nll = -_sum_pixels(discretized_gaussian_log_likelihood(x0_rows, mean, std, self.levels))
        return torch.where(t_rows == 1, nll, kl).reshape(t.shape)

    def __call__(self, eps_model: EpsModel, x0: Tensor, draws: dict[str, Tensor]) -> Tensor:
        g = self.terms(eps_model, x0, draws["t"], draws["eps"])
        return -(self.prior_kl(x0) + self.num_timesteps * g.mean(1))

    def exact(self, eps_model: EpsModel, x0: Tensor, eps: Tensor) -> Tensor:
        """-[L_T + sum_{t=1}^T g_t(eps[:, t - 1])] for noise ``eps`` (B, T, C, H, W), (B,).

        The sum over all timesteps with one noise draw per t: the quantity whose expectation
        over eps is the ELBO, and the one the MC estimator is unbiased for.
        """
        b, T = x0.shape[0], self.num_timesteps
        t = torch.arange(1, T + 1, device=x0.device).expand(b, T)
        return -(self.prior_kl(x0) + self.terms(eps_model, x0, t, eps).sum(1))


class TrajectoryLogProb(Measurement):
    """log p_theta(x_{0:T}) of a recorded sampling trajectory (paper Sec. 3.3, item 2).

    log p_theta(x_{0:T}) = log N(x_T; 0, I) + sum_{t=1}^T log N(x_{t-1}; mu_theta(x_t, t), sigma_t^2 I)

    with mu_theta the mean of Sec. 2.1 (:func:`~diffusion_attribution.diffusion.ddpm.p_mean`) and
    sigma_t^2 from ``variance`` (which should be the one used for sampling;
    ``fixed_small`` clips sigma_1^2 to beta~_2, see :func:`reverse_variances`). Estimate with
    S draws t_s ~ U{1..T}: log N(x_T; 0, I) + T/S sum_s log N(x_{t_s - 1}; ...), unbiased.

    :meth:`draw` needs ``trajectories`` (T + 1, B, C, H, W) as recorded by
    :func:`~diffusion_attribution.diffusion.ddpm.sample` (``trajectory[t] = x_t``) and returns ``t``,
    ``x_t``, ``x_prev`` (= x_{t-1}), all (B, S, ...), and ``log_prior`` (B, S), the
    theta-independent log N(x_T; 0, I) repeated along S so that every draw tensor is (B, S,
    ...) and the value stays a mean over draws. ``x0`` is not used by :meth:`__call__`
    (it is ``x_prev`` at t = 1). :meth:`exact` sums all T terms.
    """

    name = "trajectory"

    def __init__(self, schedule: NoiseSchedule, variance: Variance = "fixed_large"):
        super().__init__(schedule)
        self.variance = variance
        self.sigma2 = reverse_variances(schedule, variance)

    def draw(
        self,
        x0: Tensor,
        indices: Tensor,
        num_draws: int,
        seed: int,
        trajectories: Tensor | None = None,
    ) -> dict[str, Tensor]:
        indices = self._check(x0, indices, num_draws)
        T = self.num_timesteps
        if trajectories is None:
            raise ValueError("TrajectoryLogProb.draw needs the recorded trajectories")
        if trajectories.shape != (T + 1, *x0.shape):
            raise ValueError(
                f"trajectories must have shape {(T + 1, *x0.shape)}, got {tuple(trajectories.shape)}"
            )
        t = torch.stack(
            [
                torch.randint(1, T + 1, (num_draws,), generator=example_generator(seed, i))
                for i in indices.tolist()
            ]
        )
        traj = trajectories.transpose(0, 1)  # (B, T + 1, ...)
        rows = torch.arange(x0.shape[0])[:, None]
        x_T = traj[:, T]
        log_prior = -0.5 * _sum_pixels(x_T.pow(2)) - 0.5 * x_T[0].numel() * math.log(2 * math.pi)
        return {
            "t": t,
            "x_t": traj[rows, t],
            "x_prev": traj[rows, t - 1],
            "log_prior": log_prior[:, None].expand(-1, num_draws).contiguous(),
        }

    def step_log_probs(self, eps_model: EpsModel, t: Tensor, x_t: Tensor, x_prev: Tensor) -> Tensor:
        """log N(x_{t-1}; mu_theta(x_t, t), sigma_t^2 I) for each draw: (B, S)."""
        b, s = t.shape
        shape = x_t.shape[2:]
        t_rows = t.reshape(b * s)
        xt_rows = x_t.reshape(b * s, *shape)
        mean = p_mean(self.schedule, xt_rows, t_rows, eps_model(xt_rows, t_rows))
        var = _take(self.sigma2, t_rows, xt_rows)
        sq = _sum_pixels((x_prev.reshape(b * s, *shape) - mean).pow(2))
        d = xt_rows[0].numel()
        return (-0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)).reshape(b, s)

    def __call__(self, eps_model: EpsModel, x0: Tensor, draws: dict[str, Tensor]) -> Tensor:
        steps = self.step_log_probs(eps_model, draws["t"], draws["x_t"], draws["x_prev"])
        return draws["log_prior"].mean(1) + self.num_timesteps * steps.mean(1)

    def exact(self, eps_model: EpsModel, trajectories: Tensor) -> Tensor:
        """The full sum log N(x_T; 0, I) + sum_{t=1}^T log p_theta(x_{t-1} | x_t), (B,)."""
        T = self.num_timesteps
        b = trajectories.shape[1]
        traj = trajectories.transpose(0, 1)
        t = torch.arange(1, T + 1).expand(b, T)
        steps = self.step_log_probs(eps_model, t, traj[:, 1:], traj[:, :-1])
        x_T = traj[:, T]
        log_prior = -0.5 * _sum_pixels(x_T.pow(2)) - 0.5 * x_T[0].numel() * math.log(2 * math.pi)
        return log_prior + steps.sum(1)


class JourneyLoss(Measurement):
    """Journey-TRAK's query function (Georgiev et al., 2023): the denoising loss along the
    sample's own sampling trajectory.

    At step t of the recorded trajectory, x0_hat^t is the model's prediction of x_0 from x_t
    (:func:`~diffusion_attribution.diffusion.ddpm.predicted_x0`, clipped to [-1, 1]); it is
    noised afresh, x'_t = sqrt(alpha_bar_t) x0_hat^t + sqrt(1 - alpha_bar_t) eps, and
    l_t = ||eps - eps_theta(x'_t, t)||^2 (eq. 2 at the trajectory's own prediction; x0_hat^t
    is data, no gradient flows through it). Journey-TRAK scores each step separately; as the
    D-TRAK authors do when they compare with it, the steps are averaged here: S draws
    t ~ U{1..T}, each with its own eps, and the value is their mean, so one score attributes
    the whole trajectory.

    :meth:`draw` needs ``trajectories``: the (T + 1, B, C, H, W) predicted-x_0 trajectories
    (``predicted_x0`` of the recorded trajectory and means), and returns ``t``, ``x0_hat`` and
    ``eps``, all (B, S, ...).
    """

    name = "journey"

    def draw(
        self,
        x0: Tensor,
        indices: Tensor,
        num_draws: int,
        seed: int,
        trajectories: Tensor | None = None,
    ) -> dict[str, Tensor]:
        indices = self._check(x0, indices, num_draws)
        T = self.num_timesteps
        if trajectories is None or trajectories.shape != (T + 1, *x0.shape):
            got = None if trajectories is None else tuple(trajectories.shape)
            raise ValueError(
                f"JourneyLoss.draw needs the predicted-x_0 trajectories, shape {(T + 1, *x0.shape)}; got {got}"
            )
        ts, epss = [], []
        for index in indices.tolist():
            g = example_generator(seed, index)
            ts.append(torch.randint(1, T + 1, (num_draws,), generator=g))
            epss.append(torch.randn((num_draws, *x0.shape[1:]), generator=g, dtype=x0.dtype))
        t = torch.stack(ts)
        rows = torch.arange(x0.shape[0])[:, None]
        x0_hat = trajectories.transpose(0, 1)[rows, t].to(x0.dtype)
        return {"t": t, "x0_hat": x0_hat.to(x0.device), "eps": torch.stack(epss).to(x0.device)}

    def __call__(self, eps_model: EpsModel, x0: Tensor, draws: dict[str, Tensor]) -> Tensor:
        t, eps, x0_hat = draws["t"], draws["eps"], draws["x0_hat"]
        if x0_hat.shape != eps.shape or eps.shape[:2] != t.shape:
            raise ValueError(f"x0_hat and eps must be (B, S, ...) like t {tuple(t.shape)}")
        rows = t.numel()
        t_rows, eps_rows = t.reshape(rows), eps.reshape(rows, *eps.shape[2:])
        xt = q_sample(self.schedule, x0_hat.reshape(eps_rows.shape), t_rows, eps_rows)
        err = _sum_pixels((eps_rows - eps_model(xt, t_rows)).pow(2))
        return err.reshape(t.shape).mean(1)


MEASUREMENT_NAMES = ("loss", "elbo", "trajectory", "square_norm", "journey", "l_t=<t>")


def make_measurement(name: str, schedule: NoiseSchedule, **kwargs) -> Measurement:
    """Build a measurement from its name; ``kwargs`` go to the constructor.

    ``"loss"`` (:class:`DiffusionLoss`), ``"elbo"`` (:class:`ELBO`: ``variance``, ``levels``),
    ``"trajectory"`` (:class:`TrajectoryLogProb`: ``variance``), ``"square_norm"``
    (:class:`SquareNorm`), ``"journey"`` (:class:`JourneyLoss`), ``"l_t=<t>"`` for an integer
    t in 1..T (:class:`TimestepLoss`).
    """
    simple = {"loss": DiffusionLoss, "elbo": ELBO, "trajectory": TrajectoryLogProb}
    simple["square_norm"] = SquareNorm
    simple["journey"] = JourneyLoss
    key = name.strip()
    if key in simple:
        return simple[key](schedule, **kwargs)
    if key.startswith("l_t="):
        try:
            t = int(key[len("l_t=") :])
        except ValueError:
            raise ValueError(
                f"bad timestep in measurement {name!r}: expected e.g. 'l_t=250'"
            ) from None
        return TimestepLoss(schedule, t, **kwargs)
    raise ValueError(f"unknown measurement {name!r}; valid names: {', '.join(MEASUREMENT_NAMES)}")
