"""Would the ``measure`` stage gain from evaluating several models as one stack?

The ``measure`` stage runs forward passes only, of 108 models on the same inputs, at
``measure.batch_size`` = 1024 rows. This prints, side by side in one run and on one thread,
the ms per model of one forward pass of the default U-Net at that batch, alone and as a
:class:`~diffusion_attribution.diffusion.stacked.StackedUNet` of M models, with the ratio to
the arithmetic floor (forward FLOPs over this core's one-thread GEMM rate).

    python benchmarks/bench_measure_stack.py --stacks 2 4 8
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusion_attribution.core.sections import ModelConfig
from diffusion_attribution.diffusion.stacked import StackedUNet
from diffusion_attribution.diffusion.unet import UNet, UNetConfig


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def forward_flops(model: UNet, x: torch.Tensor, t: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x, t)
    return float(counter.get_total_flops())


def gemm_rate(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_of(lambda: a @ b, 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stacks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch", type=int, default=1024, help="rows per forward (measure.batch_size)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=1, image_size=8, **ModelConfig().model_dump())
    models = [UNet(cfg).eval() for _ in range(max(args.stacks))]
    x = torch.randn(args.batch, 1, 8, 8)
    t = torch.randint(1, 1001, (args.batch,))
    with torch.no_grad():
        floor = forward_flops(models[0], x, t) / gemm_rate()
        alone = best_of(lambda: models[0](x, t), args.repeats)
        print(
            f"one model, batch {args.batch}: {alone * 1e3:.1f} ms ({alone / floor:.2f}x the floor)"
        )
        for m in args.stacks:
            stack = StackedUNet.from_models(models[:m]).eval()
            xs = x.repeat(1, m, 1, 1)  # the same inputs for every model, stacked on channels
            per_model = best_of(lambda: stack(xs, t), args.repeats) / m  # noqa: B023
            print(
                f"stack of {m}: {per_model * 1e3:.1f} ms per model "
                f"({alone / per_model:.2f}x the model alone, {per_model / floor:.2f}x the floor)"
            )


if __name__ == "__main__":
    main()
