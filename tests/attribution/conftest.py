"""Fixtures of the attribution tests."""

import pytest
import torch

from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.unet import UNet, kfac_parameters
from tests.helpers import TINY_4X4


@pytest.fixture(scope="module")
def tiny():
    """(model, its K-FAC parameters, schedule, 7 training images): the 4x4 U-Net of
    :data:`tests.helpers.TINY_4X4` in float32 and eval mode, seeded, with a 20-step schedule."""
    torch.manual_seed(0)
    model = UNet(TINY_4X4).eval()
    schedule = NoiseSchedule.linear(20, 1e-4, 0.3)
    x = torch.rand(7, 1, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    return model, kfac_parameters(model), schedule, x
