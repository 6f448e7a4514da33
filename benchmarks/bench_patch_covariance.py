"""The expand input factor of each convolution of the default U-Net, four ways, side by side.

For every stride-1 3 x 3 convolution of the default U-Net (``params.yaml``'s ``model``
section, input shapes read off one forward pass of 8 x 8 digits) and a batch of ``--batch``
rows (512, the curvature stage's ``curvature.batch_size``), ms per call (best of
``--repeats``, one thread unless ``--threads``) of:

* ``patch matrix``: ``gram`` of the ``unfold`` patches, ``(C k^2)^2 / 2`` multiply-adds per
  position;
* ``bands``: the previous library's self-correlation plus border bands (kept here as the
  reference), used there on maps of 8 x 8 and more, the patch matrix below;
* ``displacements`` and ``position Gram``: the two forms of
  :mod:`~diffusion_attribution.curvature.patch_covariance`, and ``chosen``, the one
  :func:`~diffusion_attribution.curvature.patch_covariance.input_covariance` picks (with the
  column sums).

Each row also prints the largest difference of the chosen factor from the patch matrix's,
relative to its largest entry. The last line sums each column over the layers.

Then a fit row's parts, in ms per row, on the K-FAC anchor workload's shape (360 images, 8
draws each, as in ``bench_kronfluence.py``; random images and an untrained model, which do not
change the cost): the factor sums (``hooks.factor_sums``, MC Fisher, expand), the forward and
backward passes they make (forward with the hooks, one backward to the layer outputs), and
the eigendecompositions (``partial_sums.to_kfac``, float64). The input factors are the
convolutions' share, summed above, plus the Linear layers'.

    python benchmarks/bench_patch_covariance.py            # about a minute
    python benchmarks/bench_patch_covariance.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from diffusion_attribution.core.sections import ModelConfig
from diffusion_attribution.curvature.hooks import factor_sums
from diffusion_attribution.curvature.layers import capture, input_columns, owning_layers
from diffusion_attribution.curvature.partial_sums import to_kfac
from diffusion_attribution.curvature.patch_covariance import (
    displacement_covariance,
    fast_path_applies,
    gram,
    input_covariance,
    position_gram_covariance,
)
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.training import build_model
from diffusion_attribution.diffusion.unet import kfac_parameters

SHAPE = (1, 8, 8)


def _correlation(
    xp: Tensor, x: Tensor, k: int, rows: tuple[int, int], cols: tuple[int, int]
) -> Tensor:
    """``sum_b sum_{q in rows x cols} x[b, c, q] x0[b, c', q + delta]`` for every ``delta`` in
    ``[-(k-1), k-1]^2``: shape (C, C, 2k - 1, 2k - 1), ``delta = (m - (k-1), n - (k-1))`` at
    ``[:, :, m, n]``. ``xp`` is ``x`` zero-padded by ``k - 1`` on every side."""
    (r0, r1), (c0, c1) = rows, cols
    c = x.shape[1]
    window = xp[:, :, r0 : r1 + 2 * (k - 1), c0 : c1 + 2 * (k - 1)]
    return conv2d_weight(window, (c, c, 2 * k - 1, 2 * k - 1), x[:, :, r0:r1, c0:c1])


def _bands(tap: int, pad: int, size: int, out_size: int) -> list[tuple[int, int]]:
    """The input rows (or columns) in ``[0, size)`` that tap ``tap`` never reads: a prefix
    and / or a suffix band, as (start, stop) ranges."""
    lo, hi = max(0, tap - pad), min(size, tap - pad + out_size)
    return [band for band in ((0, lo), (hi, size)) if band[1] > band[0]]


def previous_bands(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The previous library's factor: the whole image's (2k-1) x (2k-1) self-correlation
    minus the border bands each tap does not read (inclusion-exclusion), per tap."""
    k, p = conv.kernel_size[0], conv.padding[0]
    _, c, h, w = x.shape
    h_out, w_out = h + 2 * p - k + 1, w + 2 * p - k + 1
    xp = F.pad(x, (k - 1,) * 4)
    whole = _correlation(xp, x, k, (0, h), (0, w))
    cache: dict[tuple, Tensor] = {}

    def part(rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
        if (rows, cols) not in cache:
            cache[(rows, cols)] = _correlation(xp, x, k, rows, cols)
        return cache[(rows, cols)]

    # per tap (i, j): the sums over its window W_ij, by inclusion-exclusion of border bands
    per_tap = torch.empty(k, k, c, c, 2 * k - 1, 2 * k - 1, dtype=x.dtype, device=x.device)
    for i in range(k):
        row_bands = _bands(i, p, h, h_out)
        for j in range(k):
            col_bands = _bands(j, p, w, w_out)
            total = whole.clone()
            for rows in row_bands:
                total -= part(rows, (0, w))
            for cols in col_bands:
                total -= part((0, h), cols)
            for rows in row_bands:
                for cols in col_bands:
                    total += part(rows, cols)
            per_tap[i, j] = total
    # A[(c,i,j),(c',i',j')] = per_tap[i, j, c, c', i' - i + k - 1, j' - j + k - 1]
    taps = torch.arange(k, device=x.device)
    delta = taps[None, :] - taps[:, None] + k - 1  # [i, i'] -> index of i' - i
    blocks = per_tap[
        taps.view(k, 1, 1, 1),
        taps.view(1, k, 1, 1),
        :,
        :,
        delta.view(k, 1, k, 1),
        delta.view(1, k, 1, k),
    ]  # (i, j, i', j', c, c')
    return blocks.permute(4, 0, 1, 5, 2, 3).reshape(c * k * k, c * k * k)


def conv_inputs(model_cfg: ModelConfig) -> list[tuple[str, nn.Conv2d, tuple[int, ...]]]:
    """(name, module, input shape) of every stride-1 square convolution, forward order."""
    net = build_model(model_cfg, SHAPE)
    seen, hooks = [], []
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d) and fast_path_applies(m):
            hook = m.register_forward_hook(lambda m, i, o, n=name: seen.append((n, m, i[0].shape)))
            hooks.append(hook)
    net(torch.randn(2, *SHAPE), torch.tensor([1, 2]))
    for h in hooks:
        h.remove()
    return [(n, m, tuple(s[1:])) for n, m, s in seen]


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_cfg = ModelConfig(**yaml.safe_load(open(args.params))["model"])
    g = torch.Generator().manual_seed(0)
    cols = ["patch matrix", "bands", "displacements", "position Gram", "chosen"]
    print(f"{'layer':16s} {'input':>10s} " + " ".join(f"{c:>13s}" for c in cols) + "  rel. diff")
    totals = dict.fromkeys(cols, 0.0)
    for name, conv, shape in conv_inputs(model_cfg):
        x = torch.randn(args.batch, *shape, generator=g)
        ms, diff = time_layer(conv, x, args.repeats)
        for c in cols:
            totals[c] += ms[c]
        size = "x".join(map(str, shape))
        print(
            f"{name:16s} {size:>10s} " + " ".join(f"{ms[c]:13.2f}" for c in cols) + f"  {diff:.1e}"
        )
    print(f"{'sum (ms)':27s} " + " ".join(f"{totals[c]:13.2f}" for c in cols))
    print(
        f"chosen vs bands: {totals['bands'] / totals['chosen']:.2f}x faster; "
        f"vs the patch matrix {totals['patch matrix'] / totals['chosen']:.2f}x"
    )
    print(fit_split(model_cfg, args.batch, args.repeats))


def fit_split(model_cfg: ModelConfig, batch: int, repeats: int, n: int = 360, s: int = 8) -> str:
    """ms per row of the factor sums, of their passes alone, and of the decomposition."""
    net = build_model(model_cfg, SHAPE)
    params = kfac_parameters(net)
    schedule = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, *SHAPE, generator=g) * 2 - 1
    t = torch.randint(1, 1001, (n, s), generator=g)
    eps = torch.randn(n, s, *SHAPE, generator=g)
    rows = n * s
    sums = factor_sums(net, params, schedule, x0, t, eps, batch_size=batch)
    fit = best_ms(lambda: factor_sums(net, params, schedule, x0, t, eps, batch_size=batch), repeats)
    layers = owning_layers(net, params)
    xt, tt = torch.randn(batch, *SHAPE, generator=g), torch.randint(1, 1001, (batch,), generator=g)

    def passes():
        with capture(layers) as seen:
            f = net(xt, tt).flatten(1)
        outs = [seen[ly.name][1] for ly in layers]
        torch.autograd.grad(f, outs, torch.randn_like(f))

    pass_ms = best_ms(passes, repeats) / batch
    decompose = best_ms(lambda: to_kfac(sums), max(1, repeats // 2)) / rows
    return (
        f"fit row ({rows} rows, batch {batch}, {torch.get_num_threads()} threads): factor sums "
        f"{fit / rows:.3f} ms, of which the passes {pass_ms:.3f} ms; eigendecompositions "
        f"{decompose:.3f} ms per row; fit row {fit / rows + decompose:.3f} ms"
    )


def time_layer(conv: nn.Conv2d, x: Tensor, repeats: int) -> tuple[dict[str, float], float]:
    """ms per call of each form (the bands and the chosen form with their column sums) and the
    chosen factor's largest difference from the patch matrix's, relative to its largest entry."""
    ref = gram(input_columns(conv, x, expand=True))
    large = min(x.shape[-2:]) >= 8  # where the previous library took the bands
    ms = {
        "patch matrix": best_ms(lambda: gram(input_columns(conv, x, expand=True)), repeats),
        "displacements": best_ms(lambda: displacement_covariance(conv, x), repeats),
        "position Gram": best_ms(lambda: position_gram_covariance(conv, x), repeats),
        "chosen": best_ms(lambda: input_covariance(conv, x), repeats),
    }
    bands = best_ms(lambda: previous_bands(conv, x), repeats) if large else ms["patch matrix"]
    ms["bands"] = bands + best_ms(lambda: conv_patch_sums(conv, x), repeats)
    chosen, _ = input_covariance(conv, x)
    return ms, ((chosen - ref).abs().max() / ref.abs().max()).item()


def conv_patch_sums(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The previous library's column sums: a weight gradient of every row against ones."""
    k, p = conv.kernel_size[0], conv.padding[0]
    b, c, h, w = x.shape
    ones = x.new_ones(b, 1, h + 2 * p - k + 1, w + 2 * p - k + 1)
    return conv2d_weight(x, (1, c, k, k), ones, padding=p).reshape(-1)


if __name__ == "__main__":
    main()
