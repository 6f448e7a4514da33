"""K-FAC eigendecompositions in float32 against float64: time, memory and influence scores.

One set of factor sums per model is decomposed twice (``to_kfac(..., precision=...)``); the
same float32 query and training gradients are then scored through each (eq. 6 up to the
score convention's constant, which cancels in every number printed). Per damping it prints
the relative Frobenius error of the float32 scores, the smallest per-query Spearman
correlation with the float64 ones and the overlap of their top-10 training examples.

    python benchmarks/bench_eigh_precision.py                       # digits U-Net, Ho widths 32, 64
    python benchmarks/bench_eigh_precision.py --model outputs/train/model.pt --widths

``--model``: a trained model of the pipeline (its digits training set is rebuilt from
scikit-learn's digits); otherwise each U-Net is seeded and untrained. The Ho et al. U-Net
(``configs/cifar2.yaml``'s model section) runs at the given base widths on smooth random
32x32x3 images. ``tests/curvature/test_precision.py`` runs :func:`compare` on the digits
U-Net and asserts the tolerance the profiles rely on.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
import yaml
from torch import Tensor, nn

from diffusion_attribution.core.config import ModelConfig
from diffusion_attribution.curvature.hooks import factor_sums
from diffusion_attribution.curvature.partial_sums import to_kfac
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.gradients import gradient_matrix
from diffusion_attribution.diffusion.measurements import make_measurement
from diffusion_attribution.diffusion.unet import UNet, UNetConfig, kfac_parameters

DAMPINGS = (1e-8, 1e-6, 1e-4, 1e-2, 1.0)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two vectors (no ties in continuous scores)."""
    ra, rb = (x.double().argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def kfac_bytes(K) -> int:
    return sum(
        v.numel() * v.element_size()
        for b in K.blocks
        for v in b.tensors().values()
        if v is not None
    )


def compare(
    model: nn.Module,
    schedule: NoiseSchedule,
    x_train: Tensor,
    x_query: Tensor,
    *,
    draws: int = 4,
    score_draws: int = 8,
    dampings: Sequence[float] = DAMPINGS,
    seed: int = 0,
) -> dict:
    """Float32 against float64 eigendecompositions of one K-FAC fit of ``model`` on
    ``x_train`` (``draws`` (t, eps) per example): seconds and bytes of each, and per damping
    the relative error, the minimum per-query Spearman and the top-10 overlap of the scores of
    ``x_query`` (``score_draws`` draws per gradient)."""
    params = kfac_parameters(model)
    loss = make_measurement("loss", schedule)
    ids = torch.arange(len(x_train))
    d = loss.draw(x_train, ids, draws, seed)
    sums = factor_sums(model, params, schedule, x_train, d["t"], d["eps"], mc_seed=seed)
    out: dict = {"num_parameters": sum(p.numel() for p in params)}
    K = {}
    for precision in ("float64", "float32"):
        start = time.perf_counter()
        K[precision] = to_kfac(sums, precision=precision)
        out[f"{precision}_seconds"] = time.perf_counter() - start
        out[f"{precision}_bytes"] = kfac_bytes(K[precision])
    train = gradient_matrix(
        model, params, loss, x_train, loss.draw(x_train, ids, score_draws, seed + 1)
    )
    qids = torch.arange(len(x_query))
    query = gradient_matrix(
        model, params, loss, x_query, loss.draw(x_query, qids, score_draws, seed + 2)
    )
    k = min(10, len(x_train))
    rows = {}
    for damping in dampings:
        s64 = K["float64"].inverse_apply(query, damping) @ train.T
        s32 = K["float32"].inverse_apply(query, damping) @ train.T
        rel = float((s32.double() - s64.double()).norm() / s64.double().norm())
        rho = min(spearman(s32[i], s64[i]) for i in range(len(query)))
        top = [
            len(set(s32[i].topk(k).indices.tolist()) & set(s64[i].topk(k).indices.tolist())) / k
            for i in range(len(query))
        ]
        rows[damping] = {"relative_error": rel, "min_spearman": rho, "min_top10_overlap": min(top)}
    out["dampings"] = rows
    return out


def smooth_images(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> Tensor:
    """Random images in [-1, 1], smooth (upsampled 4x4 noise plus a little pixel noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g) * 2 - 1
    x = nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def digits_images(n: int) -> Tensor:
    from sklearn.datasets import load_digits

    pixels = torch.as_tensor(load_digits().images[:n], dtype=torch.float32)
    return (pixels / 8 - 1)[:, None]


def report(name: str, r: dict) -> None:
    f64, f32 = r["float64_seconds"], r["float32_seconds"]
    print(
        f"\n{name}: {r['num_parameters']:,} parameters; decomposition float64 {f64:.2f} s, "
        f"float32 {f32:.2f} s ({f64 / f32:.2f}x); K-FAC {r['float64_bytes'] / 2**20:.1f} MiB -> "
        f"{r['float32_bytes'] / 2**20:.1f} MiB"
    )
    print(f"  {'damping':>8} {'rel. error':>11} {'min Spearman':>13} {'min top-10 overlap':>19}")
    for damping, row in r["dampings"].items():
        print(
            f"  {damping:8.0e} {row['relative_error']:11.2e} {row['min_spearman']:13.6f} "
            f"{row['min_top10_overlap']:19.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", help="a trained digits model of the pipeline (outputs/train/model.pt)"
    )
    ap.add_argument("--widths", type=int, nargs="*", default=[32, 64], help="Ho U-Net base widths")
    ap.add_argument("--examples", type=int, default=64, help="training examples of the fit")
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    schedule = NoiseSchedule.linear(1000)
    if args.model:
        from diffusion_attribution.diffusion.training import load_checked_model

        net, name = load_checked_model(args.model), f"trained model {args.model}"
    else:
        torch.manual_seed(0)
        net = UNet(UNetConfig(in_channels=1, image_size=8, **ModelConfig().model_dump()))
        name = "digits U-Net (untrained)"
    x = digits_images(args.examples + args.queries)
    report(name, compare(net, schedule, x[: args.examples], x[args.examples :]))
    cifar2 = yaml.safe_load(open("configs/cifar2.yaml"))["model"]
    for width in args.widths:
        torch.manual_seed(0)
        cfg = UNetConfig(in_channels=3, image_size=32, **{**cifar2, "base_channels": width})
        cfg = UNetConfig(**{**cfg.__dict__, "channel_mults": tuple(cfg.channel_mults),
                            "attn_resolutions": tuple(cfg.attn_resolutions)})  # fmt: skip
        x = smooth_images(args.examples + args.queries)
        r = compare(
            UNet(cfg), schedule, x[: args.examples], x[args.examples :], draws=1, score_draws=2
        )
        report(f"Ho U-Net, base width {width} (untrained)", r)


if __name__ == "__main__":
    main()
