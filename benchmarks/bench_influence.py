"""Time split and peak memory of K-FAC influence scoring (paper Sec. 3.2).

Runs the paper's method (K-FAC of the MC Fisher, expand, damping 1e-8, int8 query gradients,
query batching) for the diffusion-loss measurement on digits-2 and digits-10, each in its own
process so that its peak RSS is its own, and prints, side by side:

- the time of the per-example gradient passes (queries and training set),
- the time of everything else (preconditioning + quantisation, and the score matmuls),
  as a fraction of the gradient time ("overhead"),
- the peak resident memory of the process.

Timing does not depend on the weights, so the trained model of the pipeline is used when
``outputs/train/model.pt`` exists and a randomly initialised one of the same shape otherwise.

    python benchmarks/bench_influence.py                      # both datasets, defaults
    python benchmarks/bench_influence.py --train-draws 64     # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def child(args: argparse.Namespace) -> dict:
    from diffusion_attribution.attribution.influence import attribute
    from diffusion_attribution.attribution.scores import ScoreKey
    from diffusion_attribution.core.sections import ModelConfig
    from diffusion_attribution.curvature.fit import fit_kfac
    from diffusion_attribution.diffusion.datasets import load_dataset
    from diffusion_attribution.diffusion.ddpm import NoiseSchedule
    from diffusion_attribution.diffusion.measurements import DiffusionLoss
    from diffusion_attribution.diffusion.training import build_model, load_model
    from diffusion_attribution.diffusion.unet import kfac_parameters

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset)
    model_path = Path("outputs/train/model.pt")
    net = (
        load_model(model_path)
        if model_path.exists()
        else build_model(ModelConfig(), (1, 8, 8)).eval()
    )
    params = kfac_parameters(net)
    schedule = NoiseSchedule.linear()
    loss = DiffusionLoss(schedule)
    queries = ds.images[
        torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: args.queries]
    ]
    start = time.perf_counter()
    d = loss.draw(ds.images, torch.arange(len(ds)), args.curvature_draws, seed=2)
    K = fit_kfac(
        net,
        params,
        schedule,
        ds.images,
        d["t"],
        d["eps"],
        fisher="mc",
        kfac="expand",
        batch_size=512,
    )
    del d
    fit = time.perf_counter() - start
    spec = ScoreKey("kfac", "loss", "mc_expand", 1e-8, "int8")
    _, timings = attribute(
        net,
        params,
        ds.images,
        queries,
        {"loss": loss},
        {"mc_expand": K},
        [spec],
        train_measurement=loss,
        train_draws=args.train_draws,
        query_draws=args.query_draws,
        seed=3,
        batch_size=args.batch_size,
    )
    return {
        "dataset": args.dataset,
        "N": len(ds),
        "Q": args.queries,
        "gradient rows": len(ds) * args.train_draws + args.queries * args.query_draws,
        "K-FAC fit s": round(fit, 1),
        "query grads s": round(timings.query_gradients, 1),
        "train grads s": round(timings.train_gradients, 1),
        "precondition s": round(timings.precondition, 2),
        "scoring s": round(timings.scoring, 2),
        "overhead": f"{100 * timings.overhead:.1f}%",
        "peak RSS GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--datasets", nargs="+", default=["digits2", "digits10"])
    p.add_argument("--train-draws", type=int, default=256)
    p.add_argument("--query-draws", type=int, default=256)
    p.add_argument("--curvature-draws", type=int, default=8)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dataset:  # child process
        print(json.dumps(child(args)))
        return
    rows = []
    for name in args.datasets:
        cmd = [sys.executable, __file__, "--dataset", name] + [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k not in ("datasets", "dataset")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    keys = list(rows[0])
    width = max(len(k) for k in keys)
    print(f"{'':{width}}  " + "  ".join(f"{r['dataset']:>10}" for r in rows))
    for k in keys[1:]:
        print(f"{k:{width}}  " + "  ".join(f"{r[k]!s:>10}" for r in rows))


if __name__ == "__main__":
    main()
