"""Per-example gradients of any measurement (paper Sec. 3.2), streamed batch by batch.

For examples x_1..x_N with pre-drawn randomness (see :mod:`diffusion_attribution.diffusion.measurements`)
this computes the rows g_n = scale * grad_theta m(theta, x_n) over a given parameter list --
normally :func:`~diffusion_attribution.diffusion.unet.kfac_parameters`, the Linear/Conv2d weights and
biases K-FAC covers -- in the flat layout of :func:`flatten_params`. All other parameters and
buffers (GroupNorm) are held fixed and the model runs in eval mode.

Two implementations give the same numbers (the tests check both against a loop of
``torch.autograd.grad``):

* ``"hooks"``: one forward and one backward pass over the whole batch of B examples x S
  draws, summing the measurement over examples. In eval mode examples never interact (GroupNorm
  and attention act within an image), so the gradient w.r.t. a layer's output for example n's
  rows is that of m(theta, x_n) alone, and a Linear/Conv2d layer's per-example weight gradient
  is the sum over that example's rows (and positions) of grad_output (x) input (Goodfellow,
  2015; as in Opacus/BackPACK): one batched matrix product per Linear layer, one grouped
  ``convolution_backward`` per Conv2d layer (no im2col). Needs every parameter to be a weight
  or bias of an ``nn.Linear`` / ``nn.Conv2d`` (groups = 1, zero padding), and the
  measurement's example-major row order (documented in ``measurements``).
* ``"vmap"``: ``torch.func.vmap`` over examples of ``torch.func.grad`` of the measurement of
  a single example (called as a batch of one), through ``functional_call``. Works for any
  parameter of any model.

``method="auto"`` uses ``hooks`` when it applies, else ``vmap``. Measured on the TINY_DIGITS
U-Net (177 k parameters, 64 examples x 64 draws of the diffusion loss, float32, 2-core CPU,
best of 3 after a warm-up), in (example, draw) rows per second at 1 / 2 torch threads:

    hooks (batch 16-64)                  2300-2350 / 3900-4000
    vmap of grad (batch 8-32)            1890-1960 / 2600-3000   (batch 64: 1450 / 1560)
    loop of torch.autograd.grad          1980      / 2370
    one backward of the *summed* value   2600-2750 / 4300   (lower bound, not per-example)

so per-example gradients by hooks cost ~10-15% more than an ordinary backward pass. (An
im2col + einsum version of the conv gradients managed ~1000 rows/s.)

Memory is bounded by ``batch_size`` examples x ``draw_chunk`` draws per forward pass (about
0.5 MB per such row for TINY_DIGITS with hooks: ~1 GB peak at 32 x 64, more with vmap), plus
the (b, P) result of each batch, which is yielded before the next batch is computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm.std import tqdm

from diffusion_attribution.diffusion.conditional import bound, class_groups
from diffusion_attribution.diffusion.measurements import Measurement

__all__ = ["flatten_params", "gradient_matrix", "per_example_gradients"]

Method = Literal["auto", "hooks", "vmap"]


def flatten_params(params: Sequence[Tensor]) -> Tensor:
    """Concatenation of ``p.flatten()`` in the given order: the layout of every gradient row."""
    return torch.cat([p.reshape(-1) for p in params])


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _param_names(model: nn.Module, params: Sequence[Tensor]) -> list[str]:
    """Names (as in ``model.named_parameters()``) of ``params``, in their order."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for i, p in enumerate(params):
        if id(p) not in by_id:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of model")
        names.append(by_id[id(p)])
    if len(set(names)) != len(names):
        raise ValueError("params lists a parameter twice")
    return names


def _hook_layers(model: nn.Module, names: list[str]) -> dict[nn.Module, dict[str, str]] | None:
    """{module: {"weight"/"bias": parameter name}} if ``hooks`` applies to ``names``, else None."""
    modules = dict(model.named_modules())
    layers: dict[nn.Module, dict[str, str]] = {}
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        module = modules[mod_name]
        ok = attr in ("weight", "bias") and (
            isinstance(module, nn.Linear)
            or (
                isinstance(module, nn.Conv2d)
                and module.groups == 1
                and module.padding_mode == "zeros"
                and not isinstance(module.padding, str)
            )
        )
        if not ok:
            return None
        layers.setdefault(module, {})[attr] = name
    return layers


def _slice_draws(draws: dict[str, Tensor], rows: slice, cols: slice, dtype, device):
    out = {}
    for key, value in draws.items():
        v = value[rows, cols].to(device)
        out[key] = v.to(dtype) if (dtype is not None and v.is_floating_point()) else v
    return out


def _check_draws(draws: dict[str, Tensor], n: int) -> int:
    sizes = {tuple(v.shape[:2]) for v in draws.values()}
    if len(sizes) != 1:
        raise ValueError(f"every draw tensor needs the same leading dims (N, S), got {sizes}")
    (size,) = sizes
    if len(size) != 2 or size[0] != n:
        raise ValueError(f"draw tensors must have leading dims ({n}, S), got {size}")
    return size[1]


def _conv_weight_per_example(conv: nn.Conv2d, a: Tensor, g: Tensor, b: int) -> Tensor:
    """Per-example weight gradients (b, out, in, kh, kw) of a Conv2d from its input ``a`` and
    output gradient ``g`` (both with b * k example-major rows).

    The b examples become the groups of one grouped convolution over k rows, whose weight
    gradient (b * out, in, kh, kw) is then exactly the per-example sum over each example's
    rows (the trick of Rochette et al., 2019); one ``convolution_backward`` call, no im2col.
    """
    k = a.shape[0] // b
    a_g = a.reshape(b, k, *a.shape[1:]).transpose(0, 1).reshape(k, b * a.shape[1], *a.shape[2:])
    g_g = g.reshape(b, k, *g.shape[1:]).transpose(0, 1).reshape(k, b * g.shape[1], *g.shape[2:])
    weight = conv.weight.detach().to(a.dtype).repeat(b, 1, 1, 1)  # only its shape matters
    _, gw, _ = torch.ops.aten.convolution_backward(
        g_g,
        a_g,
        weight,
        None,
        conv.stride,
        conv.padding,
        conv.dilation,
        False,
        [0, 0],
        b,
        [False, True, False],
    )
    return gw.reshape(b, *conv.weight.shape)


def _hooks_gradients(model, state, layers, measurement, x0, draws, weight) -> dict[str, Tensor]:
    """sum_n weight * grad m(theta, x_n) per example via layer hooks: {name: (b, *shape)}."""
    b = x0.shape[0]
    acc: dict[str, Tensor] = {}

    def accumulate(name: str, value: Tensor) -> None:
        acc[name] = acc[name] + value if name in acc else value

    def forward_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor):
        a = inputs[0].detach()
        if a.shape[0] % b:
            raise RuntimeError(
                f"{type(module).__name__} saw {a.shape[0]} rows for {b} examples: the measurement"
                " must call the model on example-major rows (use method='vmap' otherwise)"
            )
        names = layers[module]

        def backward_hook(g: Tensor) -> None:
            if isinstance(module, nn.Linear):
                a_ = a.reshape(b, -1, a.shape[-1])  # (b, rows * positions, in)
                g_ = g.reshape(b, -1, g.shape[-1])  # (b, rows * positions, out)
                if "weight" in names:
                    accumulate(names["weight"], torch.bmm(g_.transpose(1, 2), a_))
                if "bias" in names:
                    accumulate(names["bias"], g_.sum(1))
            else:
                if "weight" in names:
                    accumulate(names["weight"], _conv_weight_per_example(module, a, g, b))
                if "bias" in names:
                    accumulate(
                        names["bias"], g.reshape(b, -1, g.shape[1], g[0, 0].numel()).sum((1, 3))
                    )

        if not output.requires_grad:  # first layer on a path: make its output a leaf
            output = output.detach().requires_grad_()
            leaves.append(output)
        output.register_hook(backward_hook)
        return output

    leaves: list[Tensor] = []
    handles = [m.register_forward_hook(forward_hook) for m in layers]
    try:

        def eps_model(x, t):
            return functional_call(model, state, (x, t))

        total = weight * measurement(eps_model, x0, draws).sum()
        if leaves:
            torch.autograd.backward(total, inputs=leaves)
    finally:
        for h in handles:
            h.remove()
    return acc


def _vmap_gradients(model, state, names, measurement, x0, draws, weight) -> dict[str, Tensor]:
    """Per-example gradients of weight * m(theta, x_n) by vmap over examples of grad."""
    trainable = {name: state[name] for name in names}
    fixed = {k: v for k, v in state.items() if k not in trainable}

    def value(p: dict[str, Tensor], x: Tensor, d: dict[str, Tensor]) -> Tensor:
        def eps_model(x_t, t):
            return functional_call(model, {**fixed, **p}, (x_t, t))

        batch = {k: v.unsqueeze(0) for k, v in d.items()}
        return weight * measurement(eps_model, x.unsqueeze(0), batch)[0]

    return vmap(grad(value), in_dims=(None, 0, 0))(trainable, x0, draws)


def per_example_gradients(
    model: nn.Module,
    params: Sequence[Tensor],
    measurement: Measurement,
    x0: Tensor,
    draws: dict[str, Tensor],
    *,
    batch_size: int = 32,
    draw_chunk: int | None = None,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    method: Method = "auto",
    labels: Tensor | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(slice of example ids, (b, P) gradients)`` batch by batch.

    Row n is ``scale * d m(theta, x0[n]; draws[.][n]) / d params`` in the layout of
    :func:`flatten_params`. ``draws`` is what ``measurement.draw`` returned for all N examples
    (leading dims (N, S)); it is sliced per batch of ``batch_size`` examples and, within a
    batch, into chunks of ``draw_chunk`` draws per forward pass (gradients of the chunks are
    accumulated with weights chunk size / S, exact because measurements are means over
    draws). ``dtype`` (e.g. ``torch.float64``) casts the model state, ``x0`` and the floating
    draws for the computation. The model's device is used; results stay there. ``method``:
    see the module docstring. ``labels`` (N,): the class of each example, for a
    :class:`~diffusion_attribution.diffusion.conditional.ConditionalUNet`; each example's
    gradient is taken with the model bound to its class. Sorted labels (a class-sorted
    training set) stream as above, each batch split by class; unsorted ones (samples that
    cycle through the classes) are computed class by class in full batches and yielded in
    order from a buffer of all N rows.
    """
    n = x0.shape[0]
    if labels is not None and tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    num_draws = _check_draws(draws, n)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunk = num_draws if draw_chunk is None else int(draw_chunk)
    if chunk < 1:
        raise ValueError(f"draw_chunk must be >= 1, got {draw_chunk}")
    if method not in ("auto", "hooks", "vmap"):
        raise ValueError(f"unknown method {method!r}; expected 'auto', 'hooks' or 'vmap'")
    params = list(params)
    if not params:
        raise ValueError("params is empty")
    names = _param_names(model, params)
    layers = _hook_layers(model, names) if method in ("auto", "hooks") else None
    if method == "hooks" and layers is None:
        raise ValueError("method='hooks' needs only weights/biases of nn.Linear or nn.Conv2d")
    device = params[0].device
    cast = dtype or params[0].dtype

    def state_dict() -> dict[str, Tensor]:
        state = {k: v.detach() for k, v in model.named_parameters()}
        state.update({k: v.detach() for k, v in model.named_buffers()})
        return {k: (v.to(cast) if v.is_floating_point() else v) for k, v in state.items()}

    def group_gradients(xb: Tensor, rows: slice, ids: Tensor | None) -> dict[str, Tensor]:
        """{name: (b, *shape)} of the examples ``ids`` of the batch ``rows`` (all: None)."""
        with _eval_mode(model), torch.enable_grad():
            state = state_dict()  # re-read each batch: the model may change between yields
            total: dict[str, Tensor] = {}
            for c in range(0, num_draws, chunk):
                cols = slice(c, min(c + chunk, num_draws))
                d = _slice_draws(draws, rows, cols, cast, device)
                x = xb
                if ids is not None:
                    x, d = xb[ids], {k: v[ids] for k, v in d.items()}
                weight = scale * (cols.stop - cols.start) / num_draws
                if layers is not None:
                    g = _hooks_gradients(model, state, layers, measurement, x, d, weight)
                else:
                    g = _vmap_gradients(model, state, names, measurement, x, d, weight)
                for k, v in g.items():
                    total[k] = total[k] + v if k in total else v
        return total

    def flat(total: dict[str, Tensor], b: int, like: Tensor) -> Tensor:
        return torch.cat(
            [
                total[name].reshape(b, -1) if name in total else like.new_zeros(b, p.numel())
                for name, p in zip(names, params, strict=True)
            ],
            1,
        )

    def batches() -> Iterator[tuple[slice, Tensor]]:
        starts = range(0, n, batch_size)
        for start in tqdm(starts, desc="gradients", disable=not progress, mininterval=5):
            rows = slice(start, min(start + batch_size, n))
            xb = x0[rows].to(device=device, dtype=cast)
            b = rows.stop - rows.start
            if labels is None:
                yield rows, flat(group_gradients(xb, rows, None), b, xb).detach()
                continue
            out = xb.new_zeros(b, sum(p.numel() for p in params))
            for c, ids in class_groups(labels[rows]):
                with bound(model, c):
                    ids_d = ids.to(device)
                    out[ids_d] = flat(group_gradients(xb, rows, ids_d), len(ids), xb).detach()
            yield rows, out

    # Arguments are checked at the call; the work runs only as the caller iterates.
    if labels is not None and bool((labels[1:] < labels[:-1]).any()):
        kw = dict(batch_size=batch_size, draw_chunk=draw_chunk, scale=scale, dtype=dtype)
        return _by_class(model, params, measurement, x0, draws, labels, method, kw, progress)
    return batches()


def _by_class(model, params, measurement, x0, draws, labels, method, kw, progress):
    """:func:`per_example_gradients` of unsorted ``labels``: each class's examples in full
    batches with the model bound to it, then all N rows yielded in order from a buffer."""
    n, out = x0.shape[0], None
    for c, ids in class_groups(labels):
        part = {k: v[ids] for k, v in draws.items()}
        with bound(model, c):
            for sl, g in per_example_gradients(
                model, params, measurement, x0[ids], part, method=method, **kw
            ):
                if out is None:
                    out = g.new_empty(n, g.shape[1])
                out[ids[sl].to(out.device)] = g
    size = kw["batch_size"]
    for start in tqdm(range(0, n, size), desc="gradients", disable=not progress, mininterval=5):
        rows = slice(start, min(start + size, n))
        yield rows, out[rows]


def gradient_matrix(
    model: nn.Module,
    params: Sequence[Tensor],
    measurement: Measurement,
    x0: Tensor,
    draws: dict[str, Tensor],
    **kwargs,
) -> Tensor:
    """All rows of :func:`per_example_gradients` stacked: (N, P). For small N (e.g. queries)."""
    blocks = [g for _, g in per_example_gradients(model, params, measurement, x0, draws, **kwargs)]
    return torch.cat(blocks)
