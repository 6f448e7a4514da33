"""The layers K-FAC covers and what forward / backward hooks read from them.

The parameters given to a fit must be the weights and biases of ``nn.Linear`` / ``nn.Conv2d``
modules (normally ``unet.kfac_parameters(model)``); :func:`owning_layers` finds those modules,
in ``model.named_modules()`` order (the order curvlinops uses). Per layer l and row r a forward
hook (:func:`capture`) records the inputs ``a_rs`` and outputs at the layer's positions
``s = 1..S_l`` (a Conv2d input is ``unfold``-ed into patches of ``c_in * k1 * k2`` entries,
channel-major, the order of ``weight.view(c_out, -1)``; attention's q/k/v/out are Linear on
tokens), and autograd gives the gradients ``b_rs`` w.r.t. those outputs
(:func:`layer_output_grads`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Layer",
    "capture",
    "check_output",
    "input_columns",
    "layer_inputs",
    "layer_output_grads",
    "owning_layers",
]


@dataclass(frozen=True)
class Layer:
    """A Linear / Conv2d module K-FAC covers: its ``name`` in ``model.named_modules()``, the
    ``module`` and ``positions`` ``{"weight": i, "bias": j}`` (either may be missing) of its
    parameters in ``params``; ``d_out`` x ``d_in`` is its weight viewed as a matrix."""

    name: str
    module: nn.Module
    positions: dict[str, int]

    @property
    def d_out(self) -> int:
        m = self.module
        return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features

    @property
    def d_in(self) -> int:
        m = self.module
        if isinstance(m, nn.Conv2d):
            return m.in_channels * math.prod(m.kernel_size)
        return m.in_features


def owning_layers(model: nn.Module, params: Sequence[Tensor]) -> list[Layer]:
    """The Linear/Conv2d modules owning ``params``, in ``model.named_modules()`` order (the
    order curvlinops uses), with the positions of their weight / bias in ``params``."""
    if not params:
        raise ValueError("params is empty")
    where = {id(p): i for i, p in enumerate(params)}
    if len(where) != len(params):
        raise ValueError("params contains a tensor twice")
    layers, found = [], set()
    for name, module in model.named_modules():
        pos = {}
        own = dict(module.named_parameters(recurse=False))
        for pname, p in own.items():
            if id(p) in where:
                if pname not in ("weight", "bias"):
                    raise ValueError(f"parameter {name}.{pname} is neither a weight nor a bias")
                pos[pname] = where[id(p)]
        if not pos:
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) holds parameters in params; "
                "the hooks backend supports nn.Linear and nn.Conv2d only"
            )
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            raise ValueError(
                f"Conv2d {name!r}: the hooks backend needs groups=1, padding_mode='zeros' and "
                f"integer padding (got groups={module.groups}, padding={module.padding!r}, "
                f"padding_mode={module.padding_mode!r})"
            )
        found.update(pos.values())
        layers.append(Layer(name, module, pos))
    missing = sorted(set(range(len(params))) - found)
    if missing:
        raise ValueError(
            f"params[{missing[0]}] (shape {tuple(params[missing[0]].shape)}) is not the weight "
            "or bias of a module of model"
        )
    return layers


def _conv_crops(conv: nn.Conv2d, x: Tensor) -> list[Tensor]:
    """The k1 * k2 strided crops of the zero-padded input, each (C, B, H', W'): crop
    ``(i, j)`` holds the input entry that kernel tap ``(i, j)`` multiplies at every output
    position, so stacking them after the channel gives ``unfold``'s patches (channel-major,
    then taps)."""
    (k1, k2), (s1, s2), (p1, p2), (d1, d2) = (
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
    )
    xp = F.pad(x.transpose(0, 1), (p2, p2, p1, p1))  # (C, B, H + 2 p1, W + 2 p2)
    ho = (x.shape[2] + 2 * p1 - d1 * (k1 - 1) - 1) // s1 + 1
    wo = (x.shape[3] + 2 * p2 - d2 * (k2 - 1) - 1) // s2 + 1
    return [
        xp[:, :, i * d1 : i * d1 + s1 * (ho - 1) + 1 : s1, j * d2 : j * d2 + s2 * (wo - 1) + 1 : s2]
        for i in range(k1)
        for j in range(k2)
    ]


def input_columns(module: nn.Module, x: Tensor, expand: bool) -> Tensor:
    """(d_in, rows) inputs as columns: expand, one column per (row, position) -- for a Conv2d
    the ``unfold`` patch, built from strided crops (faster than ``im2col`` on CPUs); reduce,
    one column per row, the mean over positions (for a Conv2d the mean of each crop, so no
    patch is materialised)."""
    if isinstance(module, nn.Conv2d):
        crops = _conv_crops(module, x)
        c, b = crops[0].shape[:2]
        if expand:
            return torch.stack(crops, 1).reshape(c * len(crops), -1)
        return torch.stack([cr.mean((2, 3)) for cr in crops], 1).reshape(c * len(crops), b)
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    return (rows.reshape(-1, rows.shape[-1]) if expand else rows.mean(1)).T


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """(B, S_l, d_in) inputs at the layer's positions (Conv2d: ``unfold`` patches)."""
    if isinstance(module, nn.Conv2d):
        cols = input_columns(module, x, expand=True)
        return cols.reshape(cols.shape[0], x.shape[0], -1).permute(1, 2, 0)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def layer_output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """(B, S_l, d_out) gradients w.r.t. the layer's output at its positions."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


@contextmanager
def capture(layers: Sequence[Layer]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Forward hooks recording each layer's (input, output) of one forward pass."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if name in seen:
                raise ValueError(
                    f"module {name!r} ran twice in one forward pass; K-FAC needs each layer "
                    "to be called once per forward"
                )
            seen[name] = (inputs[0], output)

        return fn

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(hook(layer.name)))
        yield seen
    finally:
        for h in handles:
            h.remove()


def check_output(f: Tensor, seen: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Raise ``FloatingPointError`` naming the first layer (in execution order) whose output
    is not finite, if the model's output is not (the MC residual is drawn, not computed from
    the output, so a NaN output would otherwise go unnoticed)."""
    if bool(torch.isfinite(f).all()):
        return
    bad = next((n for n, (_, out) in seen.items() if not bool(torch.isfinite(out).all())), None)
    where = f"first in the output of layer {bad!r}" if bad else "outside the K-FAC layers"
    raise FloatingPointError(f"non-finite values (NaN/Inf) in the model output, {where}")
