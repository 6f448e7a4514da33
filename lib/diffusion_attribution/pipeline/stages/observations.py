"""Stage ``observations``: where influence functions struggle (Sec. 4.1, App. E).

Fig. 5 computed exactly on a 1-D problem (:mod:`diffusion_attribution.evaluation.response`); Figs. 11-14
from the K-FAC influence scores (the paper's method) and the ground truth of ``measure``:
Observation 1 (later-timestep proxies help the approximation, not exact retraining) and
Observation 2 (influence predicts loss decreases that do not happen). Observation 3 (Fig. 15)
is the ``measure`` stage's.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet, select
from diffusion_attribution.core.config import Config
from diffusion_attribution.core.sections import main_variant
from diffusion_attribution.evaluation import retraining_claims
from diffusion_attribution.evaluation.bootstrap import (
    RESAMPLES,
    observation1_bootstrap,
    observation2_bootstrap,
)
from diffusion_attribution.evaluation.lds import predicted_changes, retraining_proxy
from diffusion_attribution.evaluation.response import extended_loss, optimum, response_curve
from diffusion_attribution.pipeline.figures import heatmap, predicted_vs_actual
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace

NOTEBOOK = "11_observations.ipynb"
INPUTS = ("outputs/influence", "outputs/measure", "outputs/evaluate")
OUTS: tuple[str, ...] = ()
PERSIST: tuple[str, ...] = ()
FIGURES = (
    "fig05_response_function.png",
    "fig11_timestep_proxy_influence.png",
    "fig12_timestep_proxy_retraining.png",
    "fig13_predicted_vs_actual_loss.png",
    "fig14_predicted_vs_actual_lt.png",
)
METRICS = ("metrics/observations.json",)

#: Fig. 5's problem: four points in two clusters; removing the last moves the optimum far
#: from linearly.
FIG5_POINTS, FIG5_REMOVED = (-2.0, -1.5, 1.5, 2.0), 3


def response_example() -> dict:
    """Fig. 5's numbers: the exact response theta*(eps) and the influence tangent."""
    x = np.array(FIG5_POINTS)
    eps = np.linspace(0.0, 1.0, 101)
    exact, linear = response_curve(x, FIG5_REMOVED, eps)
    return {
        "x": x,
        "j": FIG5_REMOVED,
        "eps": eps,
        "exact": exact,
        "linear": linear,
        "theta_full": exact[0],
        "theta_removed": exact[-1],
        "theta_predicted": linear[-1],
    }


def upper_beats_diagonal(matrix: pd.DataFrame) -> list[tuple[str, str]]:
    """Pairs (t, t') with t' > t (upper triangle) whose entry beats the diagonal's (t, t)."""
    names = list(matrix.index)
    return [
        (a, b)
        for i, a in enumerate(names)
        for k, b in enumerate(names)
        if k > i and matrix.iat[i, k] > matrix.iat[i, i]
    ]


def increases(predicted: torch.Tensor, actual: torch.Tensor) -> dict[str, float]:
    """Fractions of (sample, subset) pairs with a predicted / an actual increase."""
    return {
        "predicted_increase": float((predicted > 0).double().mean()),
        "actual_increase": float((actual > 0).double().mean()),
    }


def observations(
    scores: ScoreSet,
    table: pd.DataFrame,
    measured: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    masks: torch.Tensor,
    *,
    variant: str,
    damping: float,
    compression: str,
    timesteps: tuple[int, ...],
) -> StageResult:
    """Figs. 5, 11-14 and Observations 1 and 2 (the pure part of :func:`run`)."""
    Q, M, _ = measured["loss"].shape
    ts = sorted(timesteps)  # so that the upper triangle of Figs. 11, 12 is t' > t
    lt = [f"l_t={t}" for t in ts]
    kfac = dict(method="kfac", curvature=variant, damping=damping, compression=compression)
    fig5 = response_example()

    def from_table(target: str, proxy: str) -> float:
        row = select(table, target, measurement=proxy, **kfac)
        return np.nan if row is None else float(row.lds)

    fig11 = pd.DataFrame([[from_table(a, b) for b in lt] for a in lt], index=lt, columns=lt)
    fig12 = pd.DataFrame(
        [[retraining_proxy(measured[b], measured[a]).mean for b in lt] for a in lt],
        index=lt,
        columns=lt,
    )
    changes, obs2 = {}, {}
    for name in ["loss", *lt]:
        pred = predicted_changes(scores[ScoreKey(measurement=name, **kfac)][:Q], masks)  # (Q, M)
        # against the full-data reference with the same seed and epochs (`retrain` stage)
        actual = (measured[name] - reference[name][:, None, :]).mean(-1)
        changes[name] = (pred, actual)
        obs2[name] = increases(pred, actual)
    upper, retrain_upper = upper_beats_diagonal(fig11), upper_beats_diagonal(fig12)
    pairs_upper = len(lt) * (len(lt) - 1) // 2
    loss2 = obs2["loss"]
    # the claims' intervals: a paired two-way bootstrap over samples and subsets
    adv = observation1_bootstrap({n: changes[n][0] for n in lt}, measured, lt)
    inc = observation2_bootstrap(*changes["loss"])
    metrics = {
        "fig05": {
            k: round(float(fig5[k]), 4) for k in ("theta_full", "theta_removed", "theta_predicted")
        },
        "fig11_lds": fig11.round(4).to_dict(),
        "fig12_lds": fig12.round(4).to_dict(),
        "fig11_upper_beats_diagonal": len(upper),
        "fig12_upper_beats_diagonal": len(retrain_upper),
        "upper_pairs": pairs_upper,  # the (t, t') pairs with t' > t: the claim's "of N pairs"
        "observation2": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in obs2.items()},
        "bootstrap_resamples": RESAMPLES,
        "observation1_advantage": {k: v.as_dict() for k, v in adv.items()},
        "observation2_loss": {k: v.as_dict() for k, v in inc.items()},
        "claims": [
            retraining_claims.observation1(
                adv, len(upper), len(retrain_upper), pairs_upper, RESAMPLES
            ),
            retraining_claims.observation2(inc, RESAMPLES),
        ],
    }
    o1, o2 = metrics["claims"]
    diag = np.diag(fig11.to_numpy())
    shift = abs(fig5["theta_predicted"] - fig5["theta_full"]) / abs(
        fig5["theta_removed"] - fig5["theta_full"]
    )
    summary = (
        f"**This run.** *Fig. 5:* removing x_j moves the optimum from {fig5['theta_full']:.3f} to "
        f"{fig5['theta_removed']:.3f}; the influence function predicts {fig5['theta_predicted']:.3f} "
        f"(in the right direction, {shift:.0%} of the true shift: the linearisation is exact only for small eps).\n\n"
        f"*Observation 1 (Figs. 11, 12):* with K-FAC influence, a later timestep's scores beat the correct ones in "
        f"{len(upper)} of {pairs_upper} (t < t') pairs; with exact retraining in "
        f"{len(retrain_upper)} of {pairs_upper}. Diagonal of Fig. 11 (correct measurement): "
        + ", ".join(f"t = {t}: {d:.2f}" for t, d in zip(ts, diag, strict=True))
        + f". Mean advantage of l_t' over l_t over the {pairs_upper} pairs (95% bootstrap intervals, {RESAMPLES} "
        f"resamples of samples and subsets): K-FAC influence {adv['influence']}, exact retraining "
        f"{adv['retraining']}, difference {adv['difference']}."
        f" Observation 1 (later-timestep proxies help the approximation, not exact retraining): **{o1['verdict']}**."
        f"\n\n*Observation 2 (Figs. 13, 14):* K-FAC influence predicts a higher loss after removing half the data for "
        f"{loss2['predicted_increase']:.0%} of (sample, subset) pairs; the loss actually increased for "
        f"{loss2['actual_increase']:.0%}. Per timestep (predicted / actual): "
        + ", ".join(
            f"{n.replace('l_t=', 't = ')}: {v['predicted_increase']:.0%} / {v['actual_increase']:.0%}"
            for n, v in obs2.items()
            if n != "loss"
        )
        + f". For the loss with 95% intervals: actual {inc['actual_increase']}, predicted "
        f"{inc['predicted_increase']}, gap {inc['gap']}. Observation 2: **{o2['verdict']}**."
    )
    return StageResult(
        metrics=metrics,
        tables={"fig11": fig11, "fig12": fig12, "observation2": pd.DataFrame(obs2).T.round(3)},
        data={"fig5": fig5, "fig11": fig11, "fig12": fig12, "changes": changes, "shape": (Q, M)},
        summary=summary,
    )


def run(config: Config, ws: Workspace) -> StageResult:
    """:func:`observations` on this run's K-FAC scores, ground truth and LDS table."""
    gt = torch.load(ws.path(ws.GROUND_TRUTH), weights_only=True)
    result = observations(
        ScoreSet.load(ws.path(ws.INFLUENCE_SCORES)),
        pd.read_csv(ws.path(ws.LDS_TABLE)),
        gt["subsets"],
        gt["reference"],
        gt["masks"],
        variant=main_variant(config.curvature.variants),
        damping=config.influence.damping,
        compression=config.influence.compression,
        timesteps=config.influence.timesteps,
    )
    ws.write_metrics("observations", result.metrics)
    return result


# ---- figures -------------------------------------------------------------------------------


def fig_response(result: StageResult):
    """Fig. 5: the extended objective at eps = 0 and 1, and the response theta*(eps) with the
    influence function's tangent."""
    d = result.data["fig5"]
    x, j, eps = d["x"], d["j"], d["eps"]
    grid = np.linspace(-3.0, 3.0, 400)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for e, style in ((0.0, "-"), (1.0, "--")):
        a.plot(grid, extended_loss(x, j, e, grid), style, label=f"L(theta, eps = {e:g})")
        th = optimum(x, j, e)
        a.plot(th, extended_loss(x, j, e, np.array([th]))[0], "o", color="k")
    a.set(xlabel="theta", ylabel="L(theta, eps)", title=f"Down-weighting x_j = {x[j]:.1f}")
    a.legend(fontsize=8)
    b.plot(eps, d["exact"], label="exact optimum theta*(eps)")
    b.plot(eps, d["linear"], "--", label="influence function (tangent at eps = 0)")
    b.plot([0], [d["exact"][0]], "o", color="k")
    b.plot([1, 1], [d["exact"][-1], d["linear"][-1]], "o", color="tab:red")
    b.set(xlabel="eps (1 = removed)", ylabel="theta*", title="Response function")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_timestep_proxy(result: StageResult, estimator: str):
    """Figs. 11 (``estimator="influence"``) and 12 (``"retraining"``)."""
    if estimator == "influence":
        return heatmap(result.data["fig11"], "K-FAC influence (Fig. 11)")
    return heatmap(result.data["fig12"], "Exact retraining (Fig. 12)")


def fig_predicted_vs_actual_loss(result: StageResult):
    """Fig. 13: predicted against actual change of the loss."""
    Q, M = result.data["shape"]
    fig, ax = plt.subplots(figsize=(5, 4))
    predicted_vs_actual(
        ax, *result.data["changes"]["loss"], f"Loss l, {Q} samples x {M} subsets (Fig. 13)"
    )
    fig.tight_layout()
    return fig


def fig_predicted_vs_actual_lt(result: StageResult):
    """Fig. 14: the same for each l_t."""
    names = [n for n in result.data["changes"] if n != "loss"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.3))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        predicted_vs_actual(ax, *result.data["changes"][name], name.replace("l_t=", "l_t, t = "))
    fig.suptitle("Per-timestep losses (Fig. 14)")
    fig.tight_layout()
    return fig
