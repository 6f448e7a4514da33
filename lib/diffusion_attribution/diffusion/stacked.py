"""M U-Nets of one architecture evaluated as one network (``StackedUNet``).

Training many small models on a CPU is dominated by per-operator overhead, not arithmetic
(each convolution of the default U-Net is a few tens of MFLOP). The retraining stages train
many models of one architecture with the same seed and settings on different subsets, so their
computations can be batched: model ``m``'s activations are channels ``[m C, (m + 1) C)`` of one
tensor of shape ``(B, M C, H, W)``, every convolution is a grouped convolution with ``M``
groups, every GroupNorm has ``M`` times the groups (a group never straddles two models), every
channel-wise ``Linear`` is a batched matrix product over the model axis, attention and the
skip concatenations act per model. No operation mixes models, so

    StackedUNet.from_models([f_1, ..., f_M])(stack_inputs([x_1, ..., x_M]), t)
        == stack_inputs([f_1(x_1, t), ..., f_M(x_M, t)])

up to floating-point rounding, and the gradient of ``sum_m loss_m`` with respect to the
stacked parameters holds each model's own gradient in its slice (``tests/diffusion/
test_stacked.py`` checks both against :class:`~diffusion_attribution.diffusion.unet.UNet` in
float64). Parameter names are :class:`UNet`'s; a stacked tensor is the ``M`` per-model tensors
stacked along a leading axis (:func:`per_model_view`), which :meth:`StackedUNet.unstack` and
:meth:`StackedUNet.from_models` convert to and from per-model ``UNet`` state dicts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_attribution.diffusion.unet import ResBlock, UNet, UNetConfig, timestep_embedding


class StackedConv2d(nn.Module):
    """``M`` independent ``nn.Conv2d(c_in, c_out, k)`` as one grouped convolution.

    ``weight`` is ``(M c_out, c_in, k, k)``: the M per-model weights stacked along the output
    channels, the layout ``F.conv2d(..., groups=M)`` expects.
    """

    def __init__(self, m: int, c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.m, self.stride, self.padding = m, stride, padding
        self.weight = nn.Parameter(torch.empty(m * c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.empty(m * c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, groups=self.m)


class StackedLinear(nn.Module):
    """``M`` independent ``nn.Linear(c_in, c_out)``: ``y[m] = x[m] W[m]^T + b[m]`` on inputs of
    shape ``(M, N, c_in)`` (one batched matrix product)."""

    def __init__(self, m: int, c_in: int, c_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(m, c_out, c_in))
        self.bias = nn.Parameter(torch.empty(m, c_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


def _norm(m: int, groups: int, channels: int) -> nn.GroupNorm:
    """M GroupNorms of ``groups`` groups each, on the stacked channels."""
    return nn.GroupNorm(m * groups, m * channels, eps=1e-6)


def _cat_per_model(m: int, a: Tensor, b: Tensor) -> Tensor:
    """Per model, the channels of ``a`` then those of ``b`` (``UNet``'s ``cat([h, skip])``)."""
    n, _, h, w = a.shape
    return torch.cat([a.view(n, m, -1, h, w), b.view(n, m, -1, h, w)], dim=2).view(n, -1, h, w)


class StackedAttention(nn.Module):
    """:class:`~diffusion_attribution.diffusion.unet.AttentionBlock` for each of M models."""

    def __init__(self, m: int, channels: int, groups: int):
        super().__init__()
        self.m = m
        self.norm = _norm(m, groups, channels)
        self.q = StackedLinear(m, channels, channels)
        self.k = StackedLinear(m, channels, channels)
        self.v = StackedLinear(m, channels, channels)
        self.out = StackedLinear(m, channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, mc, h, w = x.shape
        m, c = self.m, mc // self.m
        # (B, M C, H, W) -> (M, B HW, C): per model, its tokens as rows
        tokens = self.norm(x).view(b, m, c, h * w).permute(1, 0, 3, 2).reshape(m, b * h * w, c)
        q, k, v = (f(tokens).view(m * b, h * w, c) for f in (self.q, self.k, self.v))
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
        out = self.out((weights @ v).view(m, b * h * w, c))
        return x + out.view(m, b, h * w, c).permute(1, 0, 3, 2).reshape(b, mc, h, w)


class StackedResBlock(nn.Module):
    """:class:`~diffusion_attribution.diffusion.unet.ResBlock` for each of M models; the time
    embedding ``temb`` has shape ``(M, B, D)``."""

    def __init__(self, m: int, c_in: int, c_out: int, temb_dim: int, cfg: UNetConfig, attn: bool):
        super().__init__()
        self.m = m
        self.norm1 = _norm(m, cfg.norm_groups, c_in)
        self.conv1 = StackedConv2d(m, c_in, c_out, 3, padding=1)
        self.temb_proj = StackedLinear(m, temb_dim, c_out)
        self.norm2 = _norm(m, cfg.norm_groups, c_out)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = StackedConv2d(m, c_out, c_out, 3, padding=1)
        self.skip = StackedConv2d(m, c_in, c_out, 1) if c_in != c_out else None
        self.attn = StackedAttention(m, c_out, cfg.norm_groups) if attn else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        proj = self.temb_proj(F.silu(temb))  # (M, B, C_out)
        h = h + proj.transpose(0, 1).reshape(h.shape[0], -1)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        h = h + (x if self.skip is None else self.skip(x))
        return h if self.attn is None else self.attn(h)


class _Resample(nn.Module):
    """:class:`~diffusion_attribution.diffusion.unet.Downsample` (``up=False``) or
    :class:`~diffusion_attribution.diffusion.unet.Upsample` (``up=True``) for M models."""

    def __init__(self, m: int, channels: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = StackedConv2d(m, channels, channels, 3, stride=1 if up else 2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class StackedUNet(nn.Module):
    """M :class:`~diffusion_attribution.diffusion.unet.UNet` s of one ``config`` as one network.

    ``forward(x, t)`` takes ``x`` of shape ``(B, M C, H, W)`` (model m's input in channels
    ``[m C, (m + 1) C)``, :func:`stack_inputs`) and timesteps ``t``, and returns the M noise predictions in the same layout. ``t`` is a scalar, ``(B,)``
    (shared by the models) or ``(M, B)`` (model m's timesteps in row m). The module tree and parameter
    names are ``UNet``'s, so ``UNet`` and ``StackedUNet`` state dicts convert key by key.
    """

    def __init__(self, config: UNetConfig, num_models: int):
        super().__init__()
        reference = UNet(config)  # validates the config; its module tree is mirrored below
        self.config, self.num_models = config, m = config, num_models
        self._shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        base, temb_dim = config.base_channels, 4 * config.base_channels
        self.temb_in = StackedLinear(m, base, temb_dim)
        self.temb_out = StackedLinear(m, temb_dim, temb_dim)
        self.conv_in = StackedConv2d(m, config.in_channels, base, 3, padding=1)
        self.down = nn.ModuleList(self._mirror(layer) for layer in reference.down)
        self.mid1 = self._mirror(reference.mid1)
        self.mid2 = self._mirror(reference.mid2)
        self.up = nn.ModuleList(self._mirror(layer) for layer in reference.up)
        self.norm_out = _norm(m, config.norm_groups, reference.conv_out.in_channels)
        self.conv_out = StackedConv2d(
            m, reference.conv_out.in_channels, config.in_channels, 3, 1, 1
        )

    def _mirror(self, layer: nn.Module) -> nn.Module:
        m, cfg = self.num_models, self.config
        if isinstance(layer, ResBlock):
            c_in, c_out = layer.conv1.in_channels, layer.conv1.out_channels
            attn = layer.attn is not None
            return StackedResBlock(m, c_in, c_out, layer.temb_proj.in_features, cfg, attn)
        return _Resample(m, layer.conv.in_channels, up=layer.conv.stride == (1, 1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        m, b = self.num_models, x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(m, b) if t.ndim < 2 else t  # scalar or (B,): the same for every model
        emb = timestep_embedding(t.reshape(-1), self.config.base_channels).to(x.dtype)
        emb = emb.view(m, b, -1)
        temb = self.temb_out(F.silu(self.temb_in(emb)))  # (M, B, 4 C)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, StackedResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid1(h, temb), temb)
        for layer in self.up:
            if isinstance(layer, StackedResBlock):
                h = layer(_cat_per_model(self.num_models, h, hs.pop()), temb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @classmethod
    def from_models(cls, models: Sequence[UNet]) -> StackedUNet:
        """The stack of ``models`` (all of one config), with their current weights."""
        configs = {model.config for model in models}
        if len(configs) != 1:
            raise ValueError(f"from_models: the models have {len(configs)} configs, need one")
        like = models[0].conv_in.weight
        stacked = cls(models[0].config, len(models)).to(device=like.device, dtype=like.dtype)
        dicts = [model.state_dict() for model in models]
        with torch.no_grad():
            for name, tensor in stacked.state_dict().items():
                tensor.copy_(torch.stack([d[name] for d in dicts]).view(tensor.shape))
        return stacked

    def unstack(self, state: dict[str, Tensor] | None = None) -> list[dict[str, Tensor]]:
        """The M per-model ``UNet`` state dicts (copies) of this stack's ``state_dict()``, or of
        ``state``, a state dict of this stack (e.g. with averaged weights)."""
        state = self.state_dict() if state is None else state
        views = {k: per_model_view(v, self.num_models) for k, v in state.items()}
        return [
            {k: v[i].reshape(self._shapes[k]).contiguous().clone() for k, v in views.items()}
            for i in range(self.num_models)
        ]


def per_model_view(tensor: Tensor, num_models: int) -> Tensor:
    """``tensor`` (a stacked parameter or its gradient) as ``(M, ...)``: entry m is model m's
    (a view, whatever the memory format)."""
    return tensor.unflatten(0, (num_models, -1))


def stack_inputs(xs: Sequence[Tensor]) -> Tensor:
    """Per-model inputs ``(B, C, H, W)`` -> the stacked layout ``(B, M C, H, W)``."""
    return torch.cat(list(xs), dim=1)


def unstack_outputs(y: Tensor, num_models: int) -> Tensor:
    """The stacked layout ``(B, M C, H, W)`` -> ``(M, B, C, H, W)``."""
    b, mc, h, w = y.shape
    return y.view(b, num_models, mc // num_models, h, w).transpose(0, 1)
