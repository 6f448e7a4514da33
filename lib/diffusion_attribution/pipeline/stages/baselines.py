"""Stage ``baselines``: TRAK, D-TRAK and similarity baselines (Sec. 4, App. G.3.1).

TRAK for the loss, ELBO and trajectory, D-TRAK and Journey-TRAK (TRAK of the denoising loss
along the sample's own trajectory, :class:`~diffusion_attribution.diffusion.measurements.JourneyLoss`),
over a damping grid relative to the mean eigenvalue of the projected empirical Fisher, in
float32 and float16; DAS (:mod:`~diffusion_attribution.attribution.das`) over the same grid
relative to its own projected Gauss-Newton matrix, in float32; the gradient dot product and cosine, the cosine of the U-Net's bottleneck
features and a model-free pixel similarity beside them. Same (t, eps) draws, score format
and convention as the ``influence`` stage. Their LDS is the ``evaluate`` stage's.
"""

from __future__ import annotations

from dataclasses import replace

import matplotlib.pyplot as plt
import pandas as pd
import torch
from scipy.stats import spearmanr

from diffusion_attribution.attribution.baselines import baseline_scores, feature_methods
from diffusion_attribution.attribution.das import OUTPUT_MEAN, OutputMean
from diffusion_attribution.attribution.projection import Projector
from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet
from diffusion_attribution.core.config import Config
from diffusion_attribution.diffusion.datasets import ImageDataset, pixel_levels
from diffusion_attribution.diffusion.ddpm import predicted_x0
from diffusion_attribution.diffusion.measurements import JourneyLoss
from diffusion_attribution.pipeline.attributed import (
    attributed_model,
    class_labels,
    measurements_of,
    sample_labels,
)
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.shards.features import FeatureSettings, sharded_train_features
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace

NOTEBOOK = "06_baselines.ipynb"
INPUTS = ("outputs/data", "outputs/train", "outputs/sample", "outputs/influence")
OUTS = ("outputs/baselines",)
PERSIST: tuple[str, ...] = ()
FIGURES = ("baselines_vs_kfac.png", "trak_precision_agreement.png")
METRICS = ("metrics/baselines.json",)

SIMILARITY_LABELS = {
    "grad_dot": "gradient dot product",
    "grad_cos": "gradient cosine",
    "pixel": "pixel similarity",
    "feature_cos": "U-Net feature cosine",
}


def mean_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows (samples) of the Spearman correlation of two (Q, N) score matrices."""
    return float(
        torch.tensor(
            [spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy(), strict=True)]
        ).mean()
    )


def agreement_tables(scores: ScoreSet, ref: torch.Tensor) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each float32 baseline's mean Spearman with K-FAC influence ``ref`` on the loss (method,
    relative damping; Journey-TRAK apart from TRAK), and each float16 matrix's with its float32
    twin."""
    rows = []
    for key, s in scores.items():
        if key.precision == "float32" and key.measurement in (
            "loss",
            "square_norm",
            OUTPUT_MEAN,
            "journey",
            "none",
        ):
            rows.append(
                {
                    "method": "journey-trak" if key.measurement == "journey" else key.method,
                    "relative_damping": scores.relative_damping(key),
                    "spearman_vs_kfac": mean_spearman(s, ref),
                }
            )
    table = pd.DataFrame(rows)
    prec_rows = []
    for key, s in scores.items():
        if key.precision == "float16":
            s32 = scores[replace(key, precision="float32")]
            prec_rows.append(
                {
                    "method": key.method,
                    "measurement": key.measurement,
                    "relative_damping": scores.relative_damping(key),
                    "spearman_fp16_fp32": mean_spearman(s, s32),
                }
            )
    prec = pd.DataFrame(prec_rows)
    return table, prec


def agreement_report(
    table: pd.DataFrame, prec: pd.DataFrame, projection_dim: int, seconds: dict, meta: dict
) -> tuple[dict, str]:
    """The stage's metrics and its summary paragraph from :func:`agreement_tables`."""
    best = table[table.method == "trak"].sort_values("spearman_vs_kfac").iloc[-1]
    dbest = table[table.method == "d-trak"].sort_values("spearman_vs_kfac").iloc[-1]
    worst16 = prec.sort_values("spearman_fp16_fp32", na_position="last").iloc[0]
    sim = {
        m: float(table[table.method == m].spearman_vs_kfac.iloc[0])
        for m in SIMILARITY_LABELS
        if (table.method == m).any()
    }
    journey = table[table.method == "journey-trak"].sort_values("spearman_vs_kfac")
    das_best = table[table.method == "das"].sort_values("spearman_vs_kfac").iloc[-1]
    metrics = {
        "projection_dim": projection_dim,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "mean_eigenvalue": dict(meta["mean_eigenvalue"]),
        "spearman_vs_kfac": {
            "trak_best": round(best.spearman_vs_kfac, 4),
            "trak_best_relative_damping": best.relative_damping,
            "dtrak_best": round(dbest.spearman_vs_kfac, 4),
            "das_best": round(das_best.spearman_vs_kfac, 4),
            **(
                {"journey_trak_best": round(float(journey.spearman_vs_kfac.iloc[-1]), 4)}
                if len(journey)
                else {}
            ),
            **{k: round(v, 4) for k, v in sim.items()},
        },
        "fp16_vs_fp32_min_spearman": round(float(prec.spearman_fp16_fp32.min()), 4),
    }
    summary = (
        f"**This run.** Projection dimension {projection_dim}. Agreement with K-FAC influence on the loss (mean "
        f"Spearman over samples): TRAK at most {best.spearman_vs_kfac:.3f} (relative damping {best.relative_damping:g}), "
        f"D-TRAK at most {dbest.spearman_vs_kfac:.3f}, DAS at most {das_best.spearman_vs_kfac:.3f}, gradient dot product {sim['grad_dot']:.3f}, cosine "
        f"{sim['grad_cos']:.3f}, pixel similarity {sim['pixel']:.3f}"
        + (f", U-Net feature cosine {sim['feature_cos']:.3f}" if "feature_cos" in sim else "")
        + (
            f", Journey-TRAK at most {journey.spearman_vs_kfac.iloc[-1]:.3f}"
            if len(journey)
            else ""
        )
        + ". In traker's float16 pipeline (X^T X accumulated, "
        f"damped and applied in float16, inverted in float32) the scores agree with float32 least at relative damping "
        f"{worst16.relative_damping:g} for {worst16.method.upper()} ({worst16.measurement}): Spearman "
        f"{worst16.spearman_fp16_fp32:.3f}"
        + (
            f"; at {n_bad} of {len(prec)} (method, damping) points float16 gives no finite scores at all. "
            if (n_bad := int(prec.spearman_fp16_fp32.isna().sum()))
            else ". "
        )
        + "Whether any of this predicts retraining is the evaluation stage's LDS."
    )
    return metrics, summary


def run(config: Config, ws: Workspace) -> StageResult:
    """Compute and save every baseline score matrix; their agreement with K-FAC influence."""
    icfg, tcfg = config.influence, config.trak
    ds = ImageDataset.load(ws.path(ws.TRAIN_SET))
    net, params = attributed_model(ws)
    samples = torch.load(ws.path(ws.SAMPLES), weights_only=True)
    queries = samples["images"]
    measurements = measurements_of(
        schedule_of(config.diffusion),
        config.diffusion.variance,
        pixel_levels(ds.name),
        icfg.timesteps,
    )
    measurements["journey"] = JourneyLoss(schedule_of(config.diffusion))  # Journey-TRAK's
    measurements[OUTPUT_MEAN] = OutputMean(schedule_of(config.diffusion))  # DAS's
    projector = Projector(
        sum(p.numel() for p in params), tcfg.projection_dim, seed=tcfg.seed, kind=tcfg.projection
    )
    features = FeatureSettings(
        train_draws=icfg.train_draws,
        seed=icfg.seed,
        batch_size=icfg.batch_size,
        projection_dim=tcfg.projection_dim,
        projection=tcfg.projection,
        projection_seed=tcfg.seed,
    )
    scores = baseline_scores(
        net,
        params,
        ds.images,
        queries,
        measurements,
        projector,
        tcfg.relative_dampings,
        query_measurements=tcfg.query_measurements,
        train_draws=icfg.train_draws,
        query_draws=icfg.query_draws,
        seed=icfg.seed,
        das=True,
        query_trajectories={
            "trajectory": samples["trajectory"],
            "journey": predicted_x0(
                schedule_of(config.diffusion), samples["trajectory"], samples["means"]
            ),
        },
        batch_size=icfg.batch_size,
        progress=True,
        train_labels=class_labels(net, ds.labels),
        query_labels=class_labels(net, sample_labels(samples)),
        # the long part, resumable per shard of the training set
        train=sharded_train_features(
            ws,
            diffusion=config.diffusion,
            settings=features,
            num_train=len(ds),
            methods=feature_methods(das=True),
        ),
    )  # computed on ws.device (the model's), saved and compared on the CPU
    # wall-clock times go to the metrics, not into the scores file: the same inputs give the
    # same bytes (two runs are compared bitwise in tests/test_smoke_run.py)
    seconds = scores.meta["seconds"]
    meta = {k: v for k, v in scores.meta.items() if k != "seconds"}
    scores = ScoreSet({key: s.cpu() for key, s in scores.items()}, meta)
    scores.save(ws.out(ws.BASELINE_SCORES))

    kfac = ScoreSet.load(ws.path(ws.INFLUENCE_SCORES))
    ref = kfac[ScoreKey("kfac", "loss", "mc_expand", icfg.damping, icfg.compression)]
    table, prec = agreement_tables(scores, ref)

    metrics, summary = agreement_report(table, prec, tcfg.projection_dim, seconds, meta)
    ws.write_metrics("baselines", metrics)
    return StageResult(
        metrics=metrics,
        tables={"agreement": table, "precision": prec},
        data={"agreement": table, "precision": prec},
        summary=summary,
    )


def fig_agreement(result: StageResult) -> plt.Figure:
    """Spearman of each baseline's scores with K-FAC influence (loss), against damping."""
    table = result.data["agreement"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for method, marker in (("trak", "o"), ("d-trak", "s"), ("das", "D"), ("journey-trak", "^")):
        t = table[table.method == method].sort_values("relative_damping")
        if len(t):
            ax.plot(t.relative_damping, t.spearman_vs_kfac, marker=marker, label=method.upper())
    for method, style in (
        ("grad_dot", "--"),
        ("grad_cos", ":"),
        ("pixel", "-."),
        ("feature_cos", (0, (1, 3))),
    ):
        value = table[table.method == method].spearman_vs_kfac
        if len(value):
            ax.axhline(
                float(value.iloc[0]), ls=style, color="gray", label=SIMILARITY_LABELS[method]
            )
    ax.set(
        xscale="log",
        xlabel="damping / mean eigenvalue of the projected curvature (empirical Fisher; DAS: GGN)",
        ylabel="Spearman with K-FAC influence",
        title="Agreement of the baselines with K-FAC influence (loss)",
    )
    ax.legend(fontsize=8)
    return fig


def fig_precision(result: StageResult) -> plt.Figure:
    """Spearman of float16 with float32 TRAK / D-TRAK scores, against damping (Fig. 18)."""
    prec = result.data["precision"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for (method, m), t in prec.groupby(["method", "measurement"]):
        t = t.sort_values("relative_damping")
        ax.plot(
            t.relative_damping, t.spearman_fp16_fp32, marker="o", label=f"{method.upper()} ({m})"
        )
    ax.set(
        xscale="log",
        xlabel="damping / mean eigenvalue",
        ylabel="Spearman(float16, float32 scores)",
        title="traker's float16 pipeline against float32 (the cause of Fig. 18)",
    )
    ax.legend(fontsize=8)
    return fig
