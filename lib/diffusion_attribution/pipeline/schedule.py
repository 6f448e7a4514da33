"""The noise schedule a run's ``diffusion`` parameters define."""

from __future__ import annotations

from diffusion_attribution.core.sections import DiffusionConfig
from diffusion_attribution.diffusion.ddpm import NoiseSchedule


def schedule_of(diffusion: DiffusionConfig) -> NoiseSchedule:
    """The linear noise schedule of ``diffusion`` (Ho et al. 2020)."""
    return NoiseSchedule.linear(diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end)
