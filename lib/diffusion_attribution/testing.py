"""Small shared fixtures for the tests and for quick experiments (no pipeline stage uses this)."""

from __future__ import annotations

from .unet import UNetConfig

#: The smallest U-Net with every layer type the library handles (convolutions, attention over
#: positions, GroupNorm, time embedding): 4x4 one-channel images, for brute-force float64 checks.
TINY_4X4 = UNetConfig(
    in_channels=1,
    image_size=4,
    base_channels=4,
    channel_mults=(1,),
    num_res_blocks=1,
    attn_resolutions=(4,),
    norm_groups=2,
)
