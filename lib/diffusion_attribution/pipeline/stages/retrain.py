"""Stage ``retrain``: models retrained on random subsets, the LDS ground truth (App. G.4).

M x K models on subsets drawn from ``retrain.seed`` (shared seeds ``retrain.seeds``, disjoint
from the full model's: seed k fixes the initialisation and the batch and noise streams of every
subset's k-th model, :mod:`diffusion_attribution.evaluation.retraining`), each for the full model's epochs
(App. G.5); one model with a seed of its own for each of the first
``retrain.independent_subsets`` subsets (the independent-seed sensitivity check); and K
references on all the data for as many epochs, against which measured changes are taken.
Jobs run through submitit; every model is named by what determines it, so a rerun trains only
what is missing, and models of other settings or code are moved aside
(``.cache/stale/retrain/``), never deleted.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffusion_attribution.core.config import Config
from diffusion_attribution.core.io import atomic_save
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.evaluation.lds import subset_masks
from diffusion_attribution.evaluation.retraining import (
    prune,
    reference_jobs,
    run_jobs,
    stack_jobs,
    subset_jobs,
)
from diffusion_attribution.pipeline.attributed import retraining_recipe
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace

NOTEBOOK = "07_retrain.ipynb"
INPUTS = ("outputs/data",)
OUTS = ("outputs/retrain",)
PERSIST = ("outputs/retrain",)
FIGURES: tuple[str, ...] = ()
METRICS = ("metrics/retrain.json",)


def reference_steps(steps: int, fraction: float) -> int:
    """Steps of a full-data reference that sees each example as often as a subset model of
    ``steps`` steps on a ``fraction`` of the data sees each of its own (App. G.5)."""
    return round(steps / fraction)


def run(config: Config, ws: Workspace) -> StageResult:
    """Train every subset model and reference that does not exist yet."""
    rcfg, tcfg = config.retrain, config.train
    data_path = ws.path(ws.TRAIN_SET)
    n = len(ImageDataset.load(data_path))
    masks = subset_masks(n, rcfg.num_subsets, rcfg.fraction, rcfg.seed)
    subset_train = tcfg.model_copy(update={"steps": rcfg.steps})
    out_dir = ws.folder("outputs/retrain/models")
    # LoRA re-runs only the fine-tuning from the shared base; a conditional profile its model
    recipe, runner = retraining_recipe(config.finetune, config.conditional, ws)
    jobs = subset_jobs(
        data_path, masks, rcfg.seeds, config.model, config.diffusion, subset_train, out_dir,
        **recipe,
    )  # fmt: skip
    indep = subset_jobs(
        data_path,
        masks[: rcfg.independent_subsets],
        rcfg.independent_seeds,
        config.model,
        config.diffusion,
        subset_train,
        out_dir,
        shared=False,
        **recipe,
    )
    ref_steps = reference_steps(rcfg.steps, rcfg.fraction)
    refs = reference_jobs(
        data_path, n, rcfg.seeds, ref_steps, config.model, config.diffusion, tcfg, out_dir,
        **recipe,
    )  # fmt: skip
    # trained in stacks of rcfg.stack_size (part of each model's name); the same order
    planned = iter(stack_jobs([job for row in jobs + indep for job in row] + refs, rcfg.stack_size))
    jobs = [[next(planned) for _ in row] for row in jobs]
    indep = [[next(planned) for _ in row] for row in indep]
    refs = [next(planned) for _ in refs]
    flat = [job for row in jobs + indep for job in row] + refs
    stale = prune(out_dir, flat, stale_dir=ws.stale_dir("retrain"))
    existing = sum(Path(j.output).exists() for j in flat)
    size = int(masks[0].sum())
    epochs = rcfg.steps * min(tcfg.batch_size, size) / size
    full_epochs = tcfg.steps * min(tcfg.batch_size, n) / n
    print(
        f"{len(masks)} subsets x {rcfg.num_seeds} shared seeds {rcfg.seeds[0]}..{rcfg.seeds[-1]} "
        f"and {len(indep)} with seeds of their own = {len(flat) - len(refs)} models of {size} "
        f"images, {rcfg.steps} steps each ({epochs:.0f} epochs; the full model: {full_epochs:.0f}), "
        f"and {len(refs)} full-data references of {ref_steps} steps; "
        f"{existing} already trained, "
        f"{len(stale)} stale files moved to {ws.stale_dir('retrain')}"
    )
    start = time.perf_counter()
    run_jobs(
        flat,
        folder=str(ws.folder(".cache/submitit/retrain")),
        runner=runner,
    )
    seconds = time.perf_counter() - start
    trained = len(flat) - existing
    atomic_save(
        {
            "masks": masks,
            "models": [[Path(j.output).name for j in row] for row in jobs],
            "independent": [Path(row[0].output).name for row in indep],
            "references": [Path(j.output).name for j in refs],
        },
        ws.out(ws.SUBSETS),
    )
    metrics = {
        "num_subsets": len(masks),
        "num_seeds": rcfg.num_seeds,
        "seeds": list(rcfg.seeds),
        "independent_subsets": len(indep),
        "subset_size": size,
        "steps": rcfg.steps,
        "epochs": round(epochs, 1),
        "full_model_epochs": round(full_epochs, 1),
        "models_trained_this_run": trained,
        "seconds": round(seconds, 1),
    }
    ws.write_metrics("retrain", metrics)
    per_model = seconds / trained if trained else float("nan")
    m = masks.double()
    pairs = (m @ m.T)[~torch.eye(len(m), dtype=torch.bool)]
    overlap = float(pairs.mean()) / float(m[0].sum())
    summary = (
        f"**This run.** {len(masks) * rcfg.num_seeds} models ({len(masks)} subsets x {rcfg.num_seeds} shared seeds "
        f"{', '.join(map(str, rcfg.seeds))}; the full model's seed {tcfg.seed} is not among them), each on "
        f"{size} of {n} images for {rcfg.steps} steps ({epochs:.0f} epochs, the full model {full_epochs:.0f}), "
        f"{len(indep)} models with a seed of their own on the first {len(indep)} subsets (the independent-seed "
        f"check), and {len(refs)} references on all {n} images for {ref_steps} steps (the same epochs). Trained "
        f"{trained} now in {seconds:.0f} s ({per_model:.1f} s of wall-clock time per model, jobs running in "
        f"parallel), reused {existing}. Two subsets share {overlap:.0%} of their images on average "
        f"(independent random subsets of fraction {rcfg.fraction}: {rcfg.fraction:.0%} expected)."
    )
    return StageResult(metrics=metrics, data={"masks": masks}, summary=summary)
