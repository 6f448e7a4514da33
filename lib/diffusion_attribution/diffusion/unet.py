"""A compact DDPM U-Net (Ho et al., 2020) built only from K-FAC-compatible layers.

The network ``eps_theta(x_t, t)`` predicts the noise ``eps`` that produced the noisy image
``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``. The architecture follows the
CIFAR-10 model of Ho et al. (2020, Appendix B), which Mlodozeniec et al. ("Influence
Functions for Scalable Data Attribution in Diffusion Models", Appendix G.2) use for all CIFAR
experiments: a wide-ResNet U-Net with GroupNorm, sinusoidal timestep embedding added in every
residual block, and single-head self-attention at the 16x16 resolution and in the middle.

Every weight outside the GroupNorm layers lives in an ``nn.Conv2d`` or ``nn.Linear`` (the
attention projections included), the only layer types curvlinops' K-FAC supports; the paper
likewise applies K-FAC to all Conv2d/Linear modules and ignores the normalisation parameters
(Appendix G.3). ``kfac_parameters`` returns exactly that parameter list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of :class:`UNet` (no defaults: the pipeline's come from
    :class:`~diffusion_attribution.core.sections.ModelConfig`, the one place they are written).

    Level ``i`` of the U-Net works at resolution ``image_size / 2**i`` with
    ``base_channels * channel_mults[i]`` channels and ``num_res_blocks`` residual blocks on the
    way down (``num_res_blocks + 1`` on the way up); blocks at a resolution listed in
    ``attn_resolutions`` are each followed by a self-attention block.
    """

    in_channels: int
    image_size: int
    base_channels: int
    channel_mults: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    norm_groups: int


#: Ho et al. (2020)'s CIFAR-10 model (35.7 M parameters), as used by Mlodozeniec et al.
HO_CIFAR10 = UNetConfig(
    in_channels=3,
    image_size=32,
    base_channels=128,
    channel_mults=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    dropout=0.1,
    norm_groups=32,
)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of timesteps ``t`` of shape (B,), returning shape (B, dim).

    As in the Transformer (Vaswani et al., 2017) and Ho et al. (2020), with ``h = dim // 2``
    and frequencies ``w_k = 10000 ** (-k / (h - 1))`` for ``k = 0, ..., h - 1``::

        emb(t) = [sin(t w_0), ..., sin(t w_{h-1}), cos(t w_0), ..., cos(t w_{h-1})]

    zero-padded by one column when ``dim`` is odd. ``t`` may be integer or float.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, device=t.device) / max(half - 1, 1)
    args = t.to(torch.get_default_dtype())[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W spatial positions, with a residual connection.

    With ``h = GroupNorm(x)`` viewed as tokens ``h in R^{HW x C}``::

        out = x + W_o softmax(Q K^T / sqrt(C)) V,   Q, K, V = W_q h, W_k h, W_v h

    where each ``W`` is an ``nn.Linear`` over channels (so K-FAC sees it); attention never mixes
    batch elements.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
        out = self.out(weights @ v)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class ResBlock(nn.Module):
    """Residual block of Ho et al. (2020), optionally followed by an :class:`AttentionBlock`.

    ``h = Conv(SiLU(GN(x))) + Linear(SiLU(temb))[:, :, None, None]``,
    ``y = skip(x) + Conv(Dropout(SiLU(GN(h))))``, where ``skip`` is a 1x1 Conv2d when the
    channel count changes and the identity otherwise; all Conv are 3x3 unless stated.
    """

    def __init__(self, c_in: int, c_out: int, temb_dim: int, cfg: UNetConfig, attention: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, c_out, eps=1e-6)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.attn = AttentionBlock(c_out, cfg.norm_groups) if attention else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        h = h + (x if self.skip is None else self.skip(x))
        return h if self.attn is None else self.attn(h)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _validate(cfg: UNetConfig) -> None:
    def fail(field: str, why: str) -> NoReturn:
        raise ValueError(f"UNetConfig.{field}={getattr(cfg, field)!r}: {why}")

    for name in ("in_channels", "image_size", "base_channels", "num_res_blocks", "norm_groups"):
        if getattr(cfg, name) < 1:
            fail(name, "must be >= 1")
    if not cfg.channel_mults or min(cfg.channel_mults) < 1:
        fail("channel_mults", "must be a non-empty tuple of positive ints")
    if not 0.0 <= cfg.dropout < 1.0:
        fail("dropout", "must lie in [0, 1)")
    if cfg.image_size % 2 ** (len(cfg.channel_mults) - 1):
        fail("image_size", "must be divisible by 2**(len(channel_mults) - 1)")
    if any(cfg.base_channels * m % cfg.norm_groups for m in cfg.channel_mults):
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        fail("norm_groups", f"must divide every level's width base_channels * mult: {widths}")
    reached = [cfg.image_size // 2**i for i in range(len(cfg.channel_mults))]
    if not set(cfg.attn_resolutions) <= set(reached):
        fail("attn_resolutions", f"every entry must be a resolution some level reaches: {reached}")


class UNet(nn.Module):
    """Noise-prediction U-Net ``eps_theta(x_t, t)`` of Ho et al. (2020).

    ``temb = Linear(SiLU(Linear(timestep_embedding(t, C))))`` with width ``4 C`` (``C`` =
    ``base_channels``); a 3x3 input conv; per level ``num_res_blocks`` ResBlocks (+attention)
    then a Downsample (except at the last level), keeping every intermediate as a skip; middle
    ResBlock, attention, ResBlock; per level (reversed) ``num_res_blocks + 1`` ResBlocks on the
    concatenation ``[h, skip]`` then an Upsample (except at level 0); GroupNorm, SiLU and a 3x3
    conv back to ``in_channels``. PyTorch default initialisation throughout (no zero-init).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        _validate(config)
        self.config = cfg = config
        base, temb_dim = cfg.base_channels, 4 * cfg.base_channels
        self.temb_in = nn.Linear(base, temb_dim)
        self.temb_out = nn.Linear(temb_dim, temb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)

        ch, res, skips = base, cfg.image_size, [base]
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                attn = res in cfg.attn_resolutions
                self.down.append(ResBlock(ch, base * mult, temb_dim, cfg, attn))
                ch = base * mult
                skips.append(ch)
            if level < len(cfg.channel_mults) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        self.mid1 = ResBlock(ch, ch, temb_dim, cfg, attention=True)
        self.mid2 = ResBlock(ch, ch, temb_dim, cfg, attention=False)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                attn = res in cfg.attn_resolutions
                self.up.append(ResBlock(ch + skips.pop(), base * mult, temb_dim, cfg, attn))
                ch = base * mult
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Predict the noise in ``x`` (B, C, H, W) at timesteps ``t`` (B,) or scalar."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = timestep_embedding(t, self.config.base_channels).to(x.dtype)
        temb = self.temb_out(F.silu(self.temb_in(emb)))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid1(h, temb), temb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def num_parameters(model: nn.Module) -> int:
    """Total number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def kfac_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of all ``nn.Linear`` / ``nn.Conv2d`` modules, in module order.

    This is the parameter list K-FAC (curvlinops) approximates the GGN over; GroupNorm
    parameters are left out, as in the paper (Appendix G.3). Use the same list for every
    gradient entering the influence computation.
    """
    params = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            params.extend(p for p in (module.weight, module.bias) if p is not None)
    return params
