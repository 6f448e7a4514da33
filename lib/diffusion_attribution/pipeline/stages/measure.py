"""Stage ``measure``: ground-truth measurements on every retrained model (Sec. 4, App. G.4).

The first ``measure.num_queries`` samples on the full model, every subset model and every
reference: loss, ELBO and trajectory log-probability from ``measure.draws`` draws per sample,
l_t at each of ``influence.timesteps`` from ``measure.timestep_draws`` draws; the same draws for
every model (common random numbers). Each model's values are cached, so an interrupted run
resumes; entries of other models or code are moved aside, never deleted. Also Fig. 15
(Observation 3), and for every measurement the seed reproducibility of exact retraining and
the upper bound on a method's LDS (:mod:`diffusion_attribution.evaluation.lds`).
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from diffusion_attribution.core.config import Config
from diffusion_attribution.core.io import atomic_save
from diffusion_attribution.diffusion.datasets import ImageDataset, pixel_levels
from diffusion_attribution.evaluation import retraining_claims
from diffusion_attribution.evaluation.ground_truth import (
    ground_truth_measurements,
    measure_models,
    stack,
)
from diffusion_attribution.evaluation.lds import lds_upper_bound, seed_reproducibility
from diffusion_attribution.pipeline.attributed import sample_labels
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace

NOTEBOOK = "08_measure.ipynb"
INPUTS = ("outputs/data", "outputs/train", "outputs/sample", "outputs/retrain")
OUTS = ("outputs/measure",)
PERSIST = ("outputs/measure",)
FIGURES = ("fig15_elbo_correlation.png",)
METRICS = ("metrics/measure.json",)


def ground_truth_summary(measured: dict, reference: dict, full: dict) -> pd.DataFrame:
    """Per measurement: the full model's mean, the mean change of a subset model against the
    reference of the same seed, how often it is positive, the spread across subsets over the
    spread across seeds, the seed reproducibility and the LDS upper bound with their standard
    errors."""
    rows = []
    for name, m in measured.items():
        change = (m - reference[name][:, None, :]).mean(-1)
        repro, bound = seed_reproducibility(m), lds_upper_bound(m)
        rows.append(
            {
                "measurement": name,
                "full model (mean)": float(full[name].mean()),
                "mean change": float(change.mean()),
                "P(subset > reference)": float((change > 0).double().mean()),
                "subset / seed spread": float(m.mean(-1).std(1).mean() / m.std(-1).mean()),
                "seed reproducibility": repro.mean,
                "reproducibility stderr": repro.stderr,
                "upper bound": bound.mean,
                "bound stderr": bound.stderr,
            }
        )
    return pd.DataFrame(rows).set_index("measurement")


def models_to_measure(ws: Workspace, subsets: dict) -> tuple[dict, list, list, list]:
    """The model files of the ``retrain`` stage's ``subsets`` (and the full model), by label:
    the models, the (M, K) grid of subset-model labels, the K reference labels and the
    independent-seed model files."""
    grid = [[Path(name).stem for name in row] for row in subsets["models"]]
    ref_labels = [Path(name).stem for name in subsets["references"]]
    independent = subsets.get("independent", [])
    models = {"full": ws.path(ws.MODEL)}
    for name in [n for row in subsets["models"] for n in row] + subsets["references"] + independent:
        models[Path(name).stem] = ws.path(f"outputs/retrain/models/{name}")
    return models, grid, ref_labels, independent


def elbo_correlations(full: torch.Tensor, elbo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fig. 15: Pearson r and Spearman rho of the samples' ELBO under the full model against
    each subset's first model."""
    all_r = torch.tensor([pearsonr(full, elbo[:, i, 0]).statistic for i in range(elbo.shape[1])])
    all_rho = torch.tensor([spearmanr(full, elbo[:, i, 0]).statistic for i in range(elbo.shape[1])])
    return all_r, all_rho


def run(config: Config, ws: Workspace) -> StageResult:
    """Measure every model (cached), stack the ground truth, test Observation 3."""
    mcfg = config.measure
    Q = mcfg.num_queries
    samples = torch.load(ws.path(ws.SAMPLES), weights_only=True)
    queries, trajectories = samples["images"][:Q], samples["trajectory"][:, :Q]
    schedule = schedule_of(config.diffusion)
    levels = pixel_levels(ImageDataset.load(ws.path(ws.TRAIN_SET)).name)
    measurements = ground_truth_measurements(
        schedule, config.diffusion.variance, levels, config.influence.timesteps
    )
    num_draws = {
        n: mcfg.timestep_draws if n.startswith("l_t=") else mcfg.draws for n in measurements
    }
    subsets = torch.load(ws.path(ws.SUBSETS), weights_only=True)
    models, grid, ref_labels, independent = models_to_measure(ws, subsets)
    print(f"{Q} samples x {len(models)} models; draws per sample: {num_draws}")
    start = time.perf_counter()
    cache = ws.folder("outputs/measure/cache")
    common = dict(trajectories=trajectories, batch_size=mcfg.batch_size)
    common["labels"] = sample_labels(samples, slice(0, Q))
    results = measure_models(
        models,
        measurements,
        queries,
        num_draws,
        mcfg.seed,
        cache,
        workers=ws.threads,
        prune=True,
        stale_dir=ws.stale_dir("measure"),
        folder=ws.folder(".cache/jobs/measure-measure"),
        **common,
    )
    seconds = time.perf_counter() - start
    measured = stack(results, grid)  # name -> (Q, M, K)
    reference = {n: v[:, 0] for n, v in stack(results, [ref_labels]).items()}  # name -> (Q, K)
    full = results["full"]
    # name -> (Q, M'): one model with a seed of its own on each of the first M' subsets
    indep = (
        {n: v[:, :, 0] for n, v in stack(results, [[Path(i).stem] for i in independent]).items()}
        if independent
        else {}
    )
    atomic_save(
        {
            "subsets": measured,
            "independent": indep,
            "reference": reference,
            "full": full,
            "num_draws": num_draws,
            "masks": subsets["masks"],
        },
        ws.out(ws.GROUND_TRUTH),
    )
    summary_table = ground_truth_summary(measured, reference, full)

    elbo = measured["elbo"]
    all_r, all_rho = elbo_correlations(full["elbo"], elbo)
    obs3 = retraining_claims.observation3(
        float(all_rho.min()), float(all_rho.max()), float(all_r.min()), float(all_r.max())
    )
    metrics = {
        "num_queries": Q,
        "num_models": len(models),
        "models_measured_this_run": len(results.measured),
        "draws": num_draws,
        "seconds": round(seconds, 1),
        "seed_reproducibility": {
            n: [round(r["seed reproducibility"], 4), round(r["reproducibility stderr"], 4)]
            for n, r in summary_table.iterrows()
        },
        "lds_upper_bound": {
            n: [round(r["upper bound"], 4), round(r["bound stderr"], 4)]
            for n, r in summary_table.iterrows()
        },
        "p_subset_loss_higher": round(float(summary_table.loc["loss", "P(subset > reference)"]), 4),
        "elbo_pearson_full_vs_subsets": [
            round(float(all_r.min()), 4),
            round(float(all_r.max()), 4),
        ],
        "elbo_spearman_full_vs_subsets": [
            round(float(all_rho.min()), 4),
            round(float(all_rho.max()), 4),
        ],
        "claims": [obs3],
    }
    ws.write_metrics("measure", metrics)
    loss = summary_table.loc["loss"]
    summary = (
        f"**This run.** {Q} samples on {len(models)} models in {seconds:.0f} s. Upper bound on the LDS of a "
        f"method scored against the mean of K = {measured['loss'].shape[2]} seeds (Spearman-Brown): "
        + ", ".join(
            f"{n} {r['upper bound']:.2f} +- {r['bound stderr']:.2f}"
            for n, r in summary_table.iterrows()
        )
        + ". Seed reproducibility (one seed predicting the mean of the others, not a bound): "
        + ", ".join(f"{n} {r['seed reproducibility']:.2f}" for n, r in summary_table.iterrows())
        + f". A subset model's loss on a sample is higher than that of the full-data reference with the same "
        f"seed and epochs in {loss['P(subset > reference)']:.0%} of (sample, subset) pairs "
        + (
            "(removing half the data mostly increases the loss, the premise of Observation 2)."
            if loss["P(subset > reference)"] > 0.5
            else "(here removing data does not mostly increase the loss, unlike the paper's premise of Observation 2)."
        )
        + f" Spread across subsets vs across seeds (loss): {loss['subset / seed spread']:.2f}.\n\n"
        f"*Fig. 15 (Observation 3):* the ELBO of the samples under the full model and under a half-data "
        f"model correlate with Spearman rho {all_rho.min():.3f} to {all_rho.max():.3f} (Pearson r {all_r.min():.3f} "
        f"to {all_r.max():.3f}) over the {elbo.shape[1]} subsets; the claim that the ELBO ranks samples almost "
        f"independently of the training data: **{obs3['verdict']}**."
    )
    return StageResult(
        metrics=metrics,
        tables={"ground_truth": summary_table.round(3)},
        data={"full_elbo": full["elbo"], "elbo": elbo, "num_queries": Q},
        summary=summary,
    )


def fig_elbo_correlation(result: StageResult) -> plt.Figure:
    """Fig. 15: the ELBO of the samples under pairs of models trained on different data."""
    full, elbo = result.data["full_elbo"], result.data["elbo"]
    pairs = [
        ("full data", full, "subset 0, seed 0", elbo[:, 0, 0]),
        ("subset 0, seed 0", elbo[:, 0, 0], "subset 1, seed 0", elbo[:, 1, 0]),
        ("subset 0, seed 0", elbo[:, 0, 0], "subset 0, seed 1", elbo[:, 0, 1]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.5))
    for ax, (na, a, nb, b) in zip(axes, pairs, strict=True):
        r, rho = pearsonr(a, b).statistic, spearmanr(a, b).statistic
        ax.scatter(a, b, s=12)
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.6)
        ax.set(xlabel=f"ELBO, {na}", ylabel=f"ELBO, {nb}", title=f"r = {r:.3f}, rho = {rho:.3f}")
    fig.suptitle(
        f"ELBO of {result.data['num_queries']} generated samples under models trained on different data"
    )
    fig.tight_layout()
    return fig
