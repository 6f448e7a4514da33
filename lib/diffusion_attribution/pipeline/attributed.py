"""The measurements the pipeline attributes: the ground truth's and D-TRAK's."""

from __future__ import annotations

from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import Measurement, SquareNorm
from diffusion_attribution.evaluation.ground_truth import ground_truth_measurements


def measurements_of(
    schedule: NoiseSchedule, variance: str, levels: int, timesteps: tuple[int, ...]
) -> dict[str, Measurement]:
    """Every measurement attributed (Sec. 3.3): the ground truth's
    (:func:`~diffusion_attribution.evaluation.ground_truth.ground_truth_measurements`: the loss l, the
    ELBO, the sampling-trajectory log-probability, l_t at each of ``timesteps``) and D-TRAK's
    square norm, in that order with the square norm before the l_t. ``levels``: the data's
    pixel levels (:func:`~diffusion_attribution.diffusion.datasets.pixel_levels`, the ELBO's
    discretised decoder)."""
    measured = ground_truth_measurements(schedule, variance, levels, timesteps)
    first = {k: v for k, v in measured.items() if not k.startswith("l_t=")}
    rest = {k: v for k, v in measured.items() if k.startswith("l_t=")}
    return {**first, "square_norm": SquareNorm(schedule), **rest}
