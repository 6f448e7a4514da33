"""What the number of measurement draws costs the LDS: the ground-truth loss re-measured with
fewer (t, eps) draws per sample on the same retrained models, and every method's loss LDS
against it, beside the LDS against the pipeline's own ground truth.

Run after the default pipeline (``dvc repro``) has written ``outputs/``:

    .venv/bin/python benchmarks/bench_measurement_draws.py            # 64 and 128 draws
    .venv/bin/python benchmarks/bench_measurement_draws.py --draws 32 64 128

The paper averages 5000 draws per sample (App. G.4); the default profile uses
``measure.draws``. Re-measurements use another seed than the pipeline's (``measure.seed +
1000``), so the row with the pipeline's own draw count measures the seed-to-seed noise of the
draws. Each model's values are cached under ``.cache/bench_measurement_draws/`` (relative to
``--root``), so a rerun only recomputes the LDS. Prints, per draw count: the LDS upper bound
and, for K-FAC influence, TRAK* and D-TRAK*, the loss LDS with its paired difference against
the LDS on the pipeline's ground truth.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from diffusion_attribution.attribution.scores import ScoreSet, select
from diffusion_attribution.core.config import load_config
from diffusion_attribution.diffusion.measurements import DiffusionLoss
from diffusion_attribution.evaluation.ground_truth import measure_models, stack
from diffusion_attribution.evaluation.lds import (
    lds,
    lds_upper_bound,
    paired_difference,
    predicted_changes,
)
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.workspace import Workspace


def load_output(ws: Workspace, rel: str) -> dict:
    return torch.load(ws.path(rel), weights_only=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=".")
    p.add_argument("--draws", type=int, nargs="+", default=[64, 128])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(Path(args.root) / "params.yaml")
    ws = Workspace(args.root, threads=args.threads)
    gt, subsets, table = (
        load_output(ws, ws.GROUND_TRUTH),
        load_output(ws, ws.SUBSETS),
        pd.read_csv(ws.path(ws.LDS_TABLE)),
    )
    masks, own = gt["masks"], gt["subsets"]["loss"]
    Q, M, K = own.shape
    queries = load_output(ws, ws.SAMPLES)["images"][:Q]
    grid = [[Path(n).stem for n in row] for row in subsets["models"]]
    models = {
        Path(n).stem: ws.path(f"outputs/retrain/models/{n}")
        for row in subsets["models"]
        for n in row
    }
    methods = {
        "K-FAC influence": dict(
            method="kfac",
            curvature="mc_expand",
            measurement="loss",
            damping=config.influence.damping,
            compression=config.influence.compression,
        ),
        "TRAK*": dict(method="trak", measurement="loss", precision="float32"),
        "D-TRAK*": dict(method="d-trak", measurement="square_norm", precision="float32"),
    }
    scores = ScoreSet.load(ws.path(ws.INFLUENCE_SCORES)) | ScoreSet.load(
        ws.path(ws.BASELINE_SCORES)
    )
    preds = {}
    for label, query in methods.items():
        row = select(table, "loss", **query)
        key = scores.one(**{**query, "damping": float(row.damping)})[0]
        preds[label] = predicted_changes(scores[key][:Q], masks)
    base = {label: lds(pred, own) for label, pred in preds.items()}
    print(
        f"{Q} samples, M = {M} subsets x K = {K} seeds; pipeline ground truth: {config.measure.draws} draws"
    )
    print(f"  {config.measure.draws:>5} draws (pipeline): bound {lds_upper_bound(own)}; "
          + "; ".join(f"{k} {v}" for k, v in base.items()))  # fmt: skip
    loss = {"loss": DiffusionLoss(schedule_of(config.diffusion))}
    for n in args.draws:
        start = time.perf_counter()
        values = measure_models(
            models,
            loss,
            queries,
            {"loss": n},
            config.measure.seed + 1000,
            ws.folder(f".cache/bench_measurement_draws/{n}"),
            batch_size=config.measure.batch_size,
            workers=args.threads,
            progress=False,
            stale_dir=ws.stale_dir("bench_measurement_draws"),
        )
        measured = stack(values, grid)["loss"]
        parts = []
        for label, pred in preds.items():
            r = lds(pred, measured)
            d = paired_difference(r.per_query, base[label].per_query)
            parts.append(f"{label} {r} ({d.mean:+.3f} +- {d.stderr:.3f})")
        print(
            f"  {n:>5} draws: bound {lds_upper_bound(measured)}; "
            + "; ".join(parts)
            + f"  [{time.perf_counter() - start:.0f} s]"
        )


if __name__ == "__main__":
    main()
