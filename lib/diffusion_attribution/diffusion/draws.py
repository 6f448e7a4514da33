"""Variance-reduced (t, eps) draws for the diffusion loss and its relatives (levers of K-FAC
influence accuracy per unit of compute).

The loss l(theta, x) = E_{t ~ U{1..T}} E_{eps ~ N(0, I)} ||eps - eps_theta(x_t, t)||^2, the
ELBO, D-TRAK's square norm and their gradients are estimated from S pre-drawn pairs
(t_s, eps_s) per example (:mod:`diffusion_attribution.diffusion.measurements`). ``Measurement.draw``
draws them i.i.d.: t_s ~ U{1..T}, eps_s ~ N(0, I). This module draws the *same format*
(``{"t": (B, S) int64 on the CPU, "eps": (B, S, C, H, W) in x0's dtype and device}``), so every
consumer (measurements, per-example gradients, K-FAC fits, :func:`~diffusion_attribution.
influence.attribute`) takes it unchanged, with two options:

* ``stratified``: the K distinct timesteps of an example (K = S, or S / 2 with antithetic
  pairs) are one per stratum of [0, 1) of width 1/K: u_k = (k + U_k) / K with U_k ~ U[0, 1)
  i.i.d., t_k = floor(T u_k) + 1 (T / K need not be an integer). Every stratum is then hit
  exactly once instead of a multinomial number of times, which removes the between-strata
  part of the variance over t. With K = T every timestep is used exactly once. The order of
  the K strata is shuffled, so each single draw is marginally U{1..T} (a uniform stratum
  with a uniform offset) and *any* subset of the draws, not only all of them, is unbiased.
* ``antithetic``: draws come in pairs (t, eps), (t, -eps) sharing the timestep (positions 2k
  and 2k + 1). The part of the integrand that is odd in eps cancels within a pair: for the
  gradient of l_t that is the leading term -2 J^T eps (J = d eps_theta / d theta at x_t),
  the pure-noise term that dominates at small t where x_t barely depends on eps. Even parts
  (e.g. ||eps||^2 in the loss *value*) are duplicated, so a pair can be worth less than two
  independent draws for those: measure, do not assume (``benchmarks/bench_kfac_draws.py``).
  Needs an even S.

Measured in ``tests/test_draws.py`` (a least-squares-fitted linear eps-model on 4x4 digits,
T = 100, S = 8, 400 replicates): stratified t cuts the variance of the loss *value* about
3x, antithetic pairs double it; for the *gradient* of the loss (what influence uses)
stratified alone gains 5-10%, antithetic alone about 25%, both together about 40%.

Both are unbiased for E_{t ~ U{1..T}} E_{eps ~ N(0, I)}: -eps ~ N(0, I), and averaged over the
K strata the stratified t is exactly uniform (P(t = j) = 1/K sum_k K |[(j-1)/T, j/T) cap
[k/K, (k+1)/K)| = 1/T). Measurements that are means over draws of such terms -- the loss
(mean of l_t), the ELBO (T times the mean of g_t), the square norm -- stay unbiased; a
measurement at one fixed t (``TimestepLoss``) keeps its t and only ``antithetic`` applies.

Seeding is that of ``Measurement.draw``: example ``i``'s draws come from
:func:`~diffusion_attribution.diffusion.measurements.example_generator` ``(seed, indices[i])`` alone, so
they do not depend on how examples are batched. With neither option the result *is*
``measurement.draw(...)`` (bit for bit), so a :class:`DrawScheme` with defaults reproduces the
pipeline.

Using them. :class:`DrawScheme` holds the options; ``DrawScheme(...).wrap(measurement)`` is a
measurement with the same value whose ``draw`` makes these draws. Everything that calls
``measurement.draw`` -- :func:`~diffusion_attribution.attribution.influence.attribute` for the query and
the training gradients, :func:`~diffusion_attribution.evaluation.ground_truth.measure` -- then uses them
without any change of its own (``attribute(..., measurements={"loss": s.wrap(loss)},
train_measurement=s.wrap(loss))``). Measurements with draws of another format
(``TrajectoryLogProb``: points of a recorded trajectory, no eps) are left to their own
``draw`` (see :func:`supports`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_attribution.diffusion.measurements import Measurement, example_generator

__all__ = ["DrawScheme", "WithDraws", "draw", "stratified_timesteps", "supports"]


def supports(measurement: Measurement) -> bool:
    """Whether ``measurement`` draws (t, eps) in the default format (and so takes these draws):
    true for the loss, l_t, the ELBO and the square norm; false for the trajectory measurement."""
    return type(measurement).draw is Measurement.draw


def stratified_timesteps(num: int, num_timesteps: int, generator: torch.Generator) -> Tensor:
    """``num`` timesteps in 1..T, one per stratum [k/num, (k+1)/num) of [0, 1), in shuffled
    order: (num,) int64 (module docstring). Consumes ``num`` uniforms, then a permutation."""
    offsets = torch.rand(num, generator=generator, dtype=torch.float64)
    u = (torch.arange(num, dtype=torch.float64) + offsets) / num
    t = (u * num_timesteps).floor().long().clamp_(0, num_timesteps - 1) + 1
    return t[torch.randperm(num, generator=generator)]


def draw(
    measurement: Measurement,
    x0: Tensor,
    indices: Tensor,
    num_draws: int,
    seed: int,
    *,
    stratified: bool = False,
    antithetic: bool = False,
    trajectories: Tensor | None = None,
) -> dict[str, Tensor]:
    """Pre-drawn randomness for ``measurement`` of examples ``x0`` (B, C, H, W) with global ids
    ``indices``, in the format of ``measurement.draw`` (module docstring).

    Neither option: exactly ``measurement.draw(x0, indices, num_draws, seed, trajectories)``.
    Otherwise, per example from ``example_generator(seed, index)``: the K = S (S / 2 with
    ``antithetic``) timesteps -- :func:`stratified_timesteps` or i.i.d. U{1..T}, or the
    measurement's fixed ``timestep`` -- then K noise images; with ``antithetic`` draw 2k + 1 is
    draw 2k with its noise negated. Measurements not :func:`supports`-ed get their own draws.
    """
    if not (stratified or antithetic) or not supports(measurement):
        return measurement.draw(x0, indices, num_draws, seed, trajectories=trajectories)
    indices = measurement._check(x0, indices, num_draws)
    if antithetic and num_draws % 2:
        raise ValueError(f"antithetic draws come in pairs: num_draws must be even, got {num_draws}")
    k = num_draws // 2 if antithetic else num_draws
    T = measurement.num_timesteps
    ts, epss = [], []
    for index in indices.tolist():
        g = example_generator(seed, index)
        if measurement.timestep is not None:
            t = torch.full((k,), measurement.timestep, dtype=torch.int64)
        elif stratified:
            t = stratified_timesteps(k, T, g)
        else:
            t = torch.randint(1, T + 1, (k,), generator=g)
        eps = torch.randn((k, *x0.shape[1:]), generator=g, dtype=x0.dtype)
        if antithetic:
            t = t.repeat_interleave(2)
            eps = torch.stack([eps, -eps], 1).reshape(num_draws, *x0.shape[1:])
        ts.append(t)
        epss.append(eps)
    return {"t": torch.stack(ts), "eps": torch.stack(epss).to(x0.device)}


@dataclass(frozen=True)
class DrawScheme:
    """A draw function with fixed options, callable like ``measurement.draw`` with the
    measurement first; :meth:`wrap` gives a measurement that draws with it.
    ``DrawScheme()`` reproduces the default draws."""

    stratified: bool = False
    antithetic: bool = False

    @property
    def label(self) -> str:
        """``"plain"``, ``"stratified"``, ``"antithetic"`` or ``"stratified+antithetic"``."""
        parts = [
            n for n, on in (("stratified", self.stratified), ("antithetic", self.antithetic)) if on
        ]
        return "+".join(parts) or "plain"

    def __call__(
        self,
        measurement: Measurement,
        x0: Tensor,
        indices: Tensor,
        num_draws: int,
        seed: int,
        trajectories: Tensor | None = None,
    ) -> dict[str, Tensor]:
        return draw(
            measurement,
            x0,
            indices,
            num_draws,
            seed,
            stratified=self.stratified,
            antithetic=self.antithetic,
            trajectories=trajectories,
        )

    def wrap(self, measurement: Measurement) -> Measurement:
        """``measurement`` with this scheme's draws (:class:`WithDraws`); itself for the
        default scheme, so plain settings run exactly the pipeline's objects."""
        if not (self.stratified or self.antithetic):
            return measurement
        return WithDraws(measurement, self)


class WithDraws(Measurement):
    """``measurement`` with ``draw`` replaced by ``scheme`` (same value, same name, same
    schedule; other attributes, e.g. :meth:`ELBO.exact`, are the wrapped measurement's)."""

    def __init__(self, measurement: Measurement, scheme: DrawScheme):
        super().__init__(measurement.schedule)
        self.measurement, self.scheme = measurement, scheme
        self.name, self.timestep = measurement.name, measurement.timestep

    def __repr__(self) -> str:
        return f"WithDraws({self.measurement!r}, {self.scheme.label})"

    def __getattr__(self, attr: str):
        if attr == "measurement":  # not set yet (e.g. while unpickling)
            raise AttributeError(attr)
        return getattr(self.measurement, attr)

    def draw(
        self,
        x0: Tensor,
        indices: Tensor,
        num_draws: int,
        seed: int,
        trajectories: Tensor | None = None,
    ) -> dict[str, Tensor]:
        return self.scheme(self.measurement, x0, indices, num_draws, seed, trajectories)

    def __call__(self, eps_model, x0: Tensor, draws: dict[str, Tensor]) -> Tensor:
        return self.measurement(eps_model, x0, draws)
