"""Small shared fixtures for the tests and for quick experiments (no pipeline stage uses this)."""

from __future__ import annotations

from diffusion_attribution.core.sections import ModelConfig
from diffusion_attribution.diffusion.unet import UNetConfig

#: The default profile's U-Net for 8x8 one-channel digits (176,849 parameters): the schema's
#: defaults, not a copy of them.
TINY_DIGITS = UNetConfig(in_channels=1, image_size=8, **ModelConfig().model_dump())

#: The smallest U-Net with every layer type the library handles (convolutions, attention over
#: positions, GroupNorm, time embedding): 4x4 one-channel images, for brute-force float64 checks.
TINY_4X4 = UNetConfig(
    in_channels=1,
    image_size=4,
    base_channels=4,
    channel_mults=(1,),
    num_res_blocks=1,
    attn_resolutions=(4,),
    dropout=0.0,
    norm_groups=2,
)
