"""Stage ``evaluate``: the LDS of every method (Sec. 4, eq. 13; Figs. 2, 4, 7, 8, 17).

Every score matrix of the ``influence`` and ``baselines`` stages against every measurement it
can predict (signs from :func:`~diffusion_attribution.evaluation.lds.proxy_sign`, never from the result),
on the retrained models of ``retrain`` measured by ``measure``. Comparisons of two methods are
paired differences over the same samples; the claims they decide are the named rules of
:mod:`diffusion_attribution.evaluation.claims`. Next to the paper's best-of-sweep damping ("*"), the
damping chosen on held-out subsets (cross-fitted over two folds). Exact retraining enters twice:
as the upper bound on any method's LDS against the K-seed mean, and as the seed reproducibility
(one seed predicting the others), which is no bound (:mod:`diffusion_attribution.evaluation.lds`).
"""

from __future__ import annotations

import pandas as pd
import torch

from diffusion_attribution.attribution.scores import KEY_FIELDS, ScoreKey, ScoreSet
from diffusion_attribution.core.config import Config
from diffusion_attribution.core.io import atomic_save, atomic_write_text
from diffusion_attribution.core.sections import main_variant
from diffusion_attribution.evaluation import claims
from diffusion_attribution.evaluation.lds import (
    LDSResult,
    lds_table,
    lds_upper_bound,
    seed_reproducibility,
)
from diffusion_attribution.evaluation.protocol import budget_effects, deviations
from diffusion_attribution.pipeline import figures
from diffusion_attribution.pipeline.ablations import (
    ABLATION_DAMPINGS,
    heldout_rows,
    hessian_ablation,
    independent_seed_lds,
)
from diffusion_attribution.pipeline.comparisons import (
    BAR_TARGETS,
    SMALL_DAMPING,
    DampingSweeps,
    Headline,
    Methods,
    best_by_precision,
    ceiling_metrics,
    damping_sweeps,
    field_comparisons,
    figure_sweeps,
    further_comparisons,
    headline,
    lds_bars,
    per_example_fisher_effect,
    rounded,
)
from diffusion_attribution.pipeline.lds_summary import (
    ceiling_line,
    round_tree,
    seed_design_line,
    summary_lines,
)
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace

NOTEBOOK = "09_evaluate.ipynb"
INPUTS = ("outputs/influence", "outputs/baselines", "outputs/measure", "metrics/protocol.json")
OUTS = ("outputs/evaluate",)
PERSIST: tuple[str, ...] = ()
FIGURES = (
    "fig02a_lds_loss.png",
    "fig02b_lds_elbo.png",
    "fig04_hessian_ablation.png",
    "fig07_damping_kfac.png",
    "fig08_damping_trak.png",
    "fig17_lds_trajectory.png",
    "fig18_trak_float16.png",
)
METRICS = ("metrics/lds.json",)

#: The rule of each claim of :func:`~diffusion_attribution.pipeline.comparisons.further_comparisons`.
FURTHER_RULES = {
    "kfac_beats_trak_elbo": claims.kfac_beats_trak_elbo,
    "tuned_kfac_vs_tuned": claims.tuned_kfac_vs_tuned,
    "trajectory_mloss": claims.trajectory_mloss,
    "trak_float16": claims.trak_float16,
}

VARIANT_NAMES = {
    "mc_expand": "MC Fisher, expand",
    "mc_reduce": "MC Fisher, reduce",
    "empirical_expand": "empirical Fisher, expand",
    "empirical_reduce": "empirical Fisher, reduce",
    "example_expand": "empirical Fisher per example (eq. 11), expand",
    "example_reduce": "empirical Fisher per example (eq. 11), reduce",
    "ekfac_mc_expand": "EK-FAC (MC Fisher, expand)",
}


def lds_of_every_pair(
    scores: ScoreSet, measured: dict[str, torch.Tensor], masks: torch.Tensor
) -> tuple[pd.DataFrame, torch.Tensor]:
    """The LDS table of every (score matrix, target) pair
    (:func:`~diffusion_attribution.evaluation.lds.lds_table`) with each matrix's relative
    damping, and the per-query LDS of its rows (rows x Q)."""
    lds_rows = lds_table(scores, measured, masks)
    per_query = torch.stack([r.pop("per_query") for r in lds_rows])
    table = pd.DataFrame(lds_rows)
    table["relative_damping"] = [
        scores.relative_damping(ScoreKey(**{f: r[f] for f in KEY_FIELDS})) for r in lds_rows
    ]
    return table, per_query


def lds_metrics(
    shape: tuple[int, int, int],
    bars: dict,
    ablation: tuple[dict, dict, dict],
    bounds: dict[str, LDSResult],
    repro: dict[str, LDSResult],
    differences: dict[str, LDSResult],
    held_rows: dict[str, dict],
    max_se: float,
) -> dict:
    """The stage's metrics (before its claims), rounded: the bars of Figs. 2 and 17, Fig. 4 at
    its three dampings, the bounds, the paired ``differences`` and the held-out damping."""
    Q, M, K = shape
    abl_all, comp_all, abl_damping = ablation
    return {
        "num_queries": Q,
        "num_subsets": M,
        "num_seeds": K,
        "loss": rounded(bars["loss"]),
        "elbo": rounded(bars["elbo"]),
        "hessian_ablation": {
            f"{t}/{setting}/{v}": {"lds": round(r.mean, 4), "stderr": round(r.stderr, 4)}
            for (t, setting, v), r in abl_all.items()
        },
        "hessian_ablation_damping": {
            f"{t}/{setting}/{v}": list(d) if isinstance(d, tuple) else d
            for (t, setting, v), d in abl_damping.items()
            if setting != "fixed"
        },
        "hessian_ablation_differences": {
            f"{t}/{setting}: {label}": {"mean": round(r.mean, 4), "stderr": round(r.stderr, 4)}
            for (t, setting, label), r in comp_all.items()
        },
        "upper_bound": {n: [round(r.mean, 4), round(r.stderr, 4)] for n, r in bounds.items()},
        "seed_reproducibility": {
            n: [round(r.mean, 4), round(r.stderr, 4)] for n, r in repro.items()
        },
        "paired_differences": {
            k: {"mean": round(r.mean, 4), "stderr": round(r.stderr, 4)}
            for k, r in differences.items()
        },
        "trajectory": rounded(bars["trajectory"]),
        "heldout_damping": {
            k: {
                "lds": round(float(v["held-out damping"]), 4),
                "stderr": round(float(v["stderr"]), 4),
                "best_of_sweep": round(float(v["best of sweep"]), 4),
            }
            for k, v in held_rows.items()
        },
        "max_stderr": round(max_se, 4),
    }


def decide_claims(
    meth: Methods,
    head: Headline,
    sweep: DampingSweeps,
    comparisons: dict[str, LDSResult],
    comp_all: dict,
) -> list[dict]:
    """The claims the LDS decides (:mod:`diffusion_attribution.evaluation.claims`): K-FAC
    against TRAK and D-TRAK, the substituted loss on the ELBO, MC against empirical Fisher and
    expand against reduce (when Fig. 4 has the pairs at the fixed damping) and the damping
    insensitivity."""
    mc_emp = {  # the per-example comparisons are reported beside the verdict's
        k: r for k, r in comparisons.items() if "MC - empirical" in k or "per-example" in k
    }
    exp_red = {k: r for k, r in comparisons.items() if "expand - reduce" in k}
    found = [
        claims.kfac_beats_trak(meth.result(head.kfac_l), meth.result(head.trak_l), head.d_trak),
        claims.kfac_vs_dtrak(meth.result(head.kfac_l), meth.result(head.dtrak_l), head.d_dtrak),
        claims.elbo_mloss(meth.result(head.kfac_e), meth.result(head.kfac_e_proxy), head.d_proxy),
    ]
    held_mc_emp = {
        f"{t}: {label}": r
        for (t, setting, label), r in comp_all.items()
        if setting == "held-out" and "MC - empirical" in label
    }
    if any("MC - empirical" in k for k in mc_emp):
        found.append(claims.mc_beats_empirical(mc_emp, held_mc_emp))
    if exp_red:
        found.append(claims.expand_beats_reduce(exp_red))
    found.append(claims.damping_insensitivity(sweep.kfac_range, sweep.trak_drop, sweep.dtrak_drop))
    for key, (label, row, diff) in field_comparisons(meth).items():
        found.append(
            claims.kfac_vs_method(key, label, meth.result(head.kfac_l), meth.result(row), diff)
        )
    return found


def seed_design_metrics(indep_table: pd.DataFrame) -> dict:
    """The independent-seed check's LDS per method, rounded."""
    return {
        label: {
            "shared": round(float(r["shared seed"]), 4),
            "independent": round(float(r["independent seeds"]), 4),
            "difference": round(float(r["independent - shared"]), 4),
            "stderr": round(float(r["stderr  "]), 4),
        }
        for label, r in indep_table.iterrows()
    }


def tables_of(
    table: pd.DataFrame,
    heldout: pd.DataFrame,
    ablation: tuple[dict, dict, dict],
    variants: tuple[str, ...],
    indep_table: pd.DataFrame | None,
    bars: dict,
) -> dict[str, pd.DataFrame]:
    """The tables the notebook shows: the LDS of every pair, the held-out damping, Fig. 4's
    differences and LDS, the independent-seed check and the bars of each chart."""
    abl_all, comp_all, _ = ablation
    return {
        "lds": table,
        "heldout": heldout,
        "ablation": pd.DataFrame(
            {
                f"{t}, {setting} damping: {label}": {"mean": r.mean, "stderr": r.stderr}
                for (t, setting, label), r in comp_all.items()
            }
        ).T.round(4),
        "ablation_lds": pd.DataFrame(
            {
                (t, setting): {
                    v: f"{r.mean:.3f} ± {r.stderr:.3f}"
                    for v in variants
                    if (r := abl_all.get((t, setting, v)))
                }
                for t in ("loss", "elbo")
                for setting in ABLATION_DAMPINGS
            }
        ).T,
        **({"independent_seeds": indep_table.round(4)} if indep_table is not None else {}),
        **{f"bars_{t}": pd.DataFrame(rounded(b)).T for t, b in bars.items()},
    }


def evaluate(
    scores: ScoreSet,
    measured: dict[str, torch.Tensor],
    masks: torch.Tensor,
    *,
    variants: tuple[str, ...],
    damping: float,
    compression: str,
    independent: dict[str, torch.Tensor] | None = None,
) -> StageResult:
    """Every LDS, the figures' numbers and the claims they decide, from scores and ground truth
    (no files: the pure part of :func:`run`). ``independent``: the measurements {name: (Q, M')}
    of the independent-seed models on the first M' subsets, when there are any."""
    shape = Q, M, K = next(iter(measured.values())).shape
    table, per_query = lds_of_every_pair(scores, measured, masks)
    bounds = {name: lds_upper_bound(m) for name, m in measured.items()}
    repro = {name: seed_reproducibility(m) for name, m in measured.items()}
    meth = Methods(table, per_query, main_variant(variants), damping, compression)
    bars = {t: lds_bars(meth, bounds, repro, t) for t in BAR_TARGETS}
    held_rows, held = heldout_rows(meth, scores, measured, masks)

    # Fig. 4: the Hessian ablation at the fixed, the best and the held-out damping
    ablation = hessian_ablation(meth, scores, measured, masks, variants)
    comp_all = ablation[1]
    comparisons = {
        f"{t}: {label}": r for (t, setting, label), r in comp_all.items() if setting == "fixed"
    }
    effects = (
        budget_effects(
            scores[ScoreKey(**{f: kfac_row[f] for f in KEY_FIELDS})], measured["loss"], masks
        )
        if (kfac_row := meth.pick("loss", measurement="loss", **meth.kfac)) is not None
        else {}
    )
    if independent:
        effects["seed design"] = "see the seed-design line: LDS against independent seeds"
    effects |= per_example_fisher_effect(*ablation[:2])
    indep_table = (
        independent_seed_lds(meth, scores, measured["loss"], independent["loss"], masks)
        if independent
        else None
    )
    head = headline(meth)
    sweep = damping_sweeps(meth, head)  # Figs. 7, 8
    further = further_comparisons(meth, ablation[0].get(("loss", "held-out", meth.main)), held)
    max_se = max(  # over the plotted methods (the ceiling is not a method)
        v["stderr"] for b in bars.values() for v in b.values() if v["group"] != "exact retraining"
    )
    differences = {
        "loss: K-FAC - TRAK*": head.d_trak,
        "loss: K-FAC - D-TRAK*": head.d_dtrak,
        "loss: K-FAC - pixel similarity": head.d_pixel,
        **head.ekfac_diffs,
        "elbo: K-FAC (m. loss) - K-FAC": head.d_proxy,
        **comparisons,
        **{f"loss: K-FAC - {label}": d for label, _, d in field_comparisons(meth).values()},
        **{label: d for parts in further.values() for label, d in parts.items()},
    }
    metrics = lds_metrics(shape, bars, ablation, bounds, repro, differences, held_rows, max_se)
    # Figs. 7, 8: what the damping claim quotes
    metrics["damping_sweep"] = {
        "small_damping_at_most": SMALL_DAMPING,
        "kfac_range_small_damping": round(sweep.kfac_range, 4),
        "trak_drop": round(sweep.trak_drop, 4),
        "dtrak_drop": round(sweep.dtrak_drop, 4),
    }
    ceiling = ceiling_metrics(measured["loss"], meth.result(head.kfac_l))
    metrics["ceiling"] = {"loss": round_tree(ceiling)}
    found = decide_claims(meth, head, sweep, comparisons, comp_all)
    found += [FURTHER_RULES[key](parts) for key, parts in further.items()]
    metrics["claims"] = found
    lines = summary_lines(
        shape, max_se, head, sweep, bounds, repro, comparisons, comp_all, held_rows,
        bars["trajectory"], found, damping,
    )  # fmt: skip
    lines.append(ceiling_line(ceiling, bounds["loss"], shape))
    if indep_table is not None:
        lines.append(seed_design_line(independent["loss"].shape[1], indep_table))
        metrics["independent_seeds"] = seed_design_metrics(indep_table)
    sweeps = figure_sweeps(meth)
    precision = best_by_precision(sweeps)
    metrics["precision"] = precision
    lines.append(
        "*Fig. 18:* best loss LDS over the damping sweep in float16 (traker's default pipeline: X^T X "
        "accumulated, damped and applied in float16) against float32: "
        + "; ".join(
            f"{m.upper()} {v['float16']:.3f} vs {v['float32']:.3f}" for m, v in precision.items()
        )
        + "."
    )
    abl_all, _, _ = ablation
    return StageResult(
        metrics=metrics,
        tables=tables_of(table, pd.DataFrame(held_rows).T, ablation, variants, indep_table, bars),
        data={
            "per_query": per_query,
            "bars": bars,
            "ablation": {
                (f"{t}, {setting}", v): (r.mean, r.stderr) for (t, setting, v), r in abl_all.items()
            },
            "variants": variants,
            "damping": damping,
            "sweeps": sweeps,
            "budget_effects": effects,
            "shape": (Q, M, K),
        },
        summary="\n\n".join(lines),
    )


def run(config: Config, ws: Workspace) -> StageResult:
    """:func:`evaluate` on this run's scores and ground truth; saves the LDS table."""
    gt = torch.load(ws.path(ws.GROUND_TRUTH), weights_only=True)
    scores = ScoreSet.load(ws.path(ws.INFLUENCE_SCORES)) | ScoreSet.load(
        ws.path(ws.BASELINE_SCORES)
    )
    result = evaluate(
        scores,
        gt["subsets"],
        gt["masks"],
        variants=config.curvature.variants,
        damping=config.influence.damping,
        compression=config.influence.compression,
        independent=gt.get("independent") or None,
    )
    result.tables["deviations"] = deviations(
        {
            "data": config.data,
            "model": config.model,
            "diffusion": config.diffusion,
            "train": config.train,
            "curvature": config.curvature,
            "retrain": config.retrain,
            "measure": config.measure,
            "counterfactual": config.counterfactual,
            "influence": config.influence,
            "trak": config.trak,
        },
        num_train=int(gt["masks"].shape[1]),
        effects=result.data["budget_effects"],
        protocol_metrics=ws.read_metrics("protocol"),  # the protocol stage's measured effects
    )
    result.data["damping_figures"] = DAMPING_FIGURES.get(config.data.dataset, (7, 8))
    atomic_write_text(result.tables["lds"].to_csv(index=False), ws.out(ws.LDS_TABLE))
    # the report (diffusion_attribution.pipeline.report) shows the deviations table as written here
    deviations_csv = result.tables["deviations"].reset_index().to_csv(index=False)
    atomic_write_text(deviations_csv, ws.out("outputs/evaluate/deviations.csv"))
    # a per-query LDS is NaN where it is undefined (e.g. float16 scores that overflowed)
    per_query = ws.out("outputs/evaluate/lds_per_query.pt")
    atomic_save({"per_query": result.data["per_query"]}, per_query, finite=False)
    ws.write_metrics("lds", result.metrics)
    Q, M, K = result.data["shape"]
    print(
        f"{len(result.tables['lds'])} (score matrix, target) pairs; {Q} samples, M = {M} subsets, K = {K} seeds"
    )
    return result


# ---- figures -------------------------------------------------------------------------------

FIG2_TITLES = {
    "loss": "LDS, loss measurement (Fig. 2a)",
    "elbo": "LDS, ELBO measurement (Fig. 2b)",
    "trajectory": "LDS, sampling-trajectory log-probability (Fig. 17)",
}


def fig_lds(result: StageResult, target: str):
    """Figs. 2a, 2b, 17: LDS of every method for ``target`` with the retraining ceiling."""
    return figures.lds_bars(result.data["bars"][target], FIG2_TITLES[target], result.data["shape"])


def fig_hessian_ablation(result: StageResult):
    """Fig. 4: MC vs empirical Fisher x K-FAC expand vs reduce, loss and ELBO, at the paper's
    fixed damping, at each variant's best damping and at its held-out damping."""
    groups = [f"{t}, {setting}" for t in ("loss", "elbo") for setting in ABLATION_DAMPINGS]
    fig = figures.grouped_bars(
        result.data["ablation"],
        groups,
        list(result.data["variants"]),
        VARIANT_NAMES,
        "Hessian approximation ablation (Fig. 4): fixed, best and held-out damping",
        labels={
            g: g.replace("elbo", "ELBO")
            .replace(", ", "\n")
            .replace("fixed", f"fixed {result.data['damping']:g}")
            for g in groups
        },
    )
    fig.set_size_inches(9, 3.8)
    return fig


#: The paper's numbers of the two damping figures: Figs. 7, 8 on CIFAR-2 (and the 2-class
#: profiles), Figs. 9, 10 on CIFAR-10 (and the 10-class digits profile).
DAMPING_FIGURES = {"digits10": (9, 10), "cifar10": (9, 10)}


def fig_damping_kfac(result: StageResult):
    """Fig. 7 (Fig. 9 on a 10-class dataset): K-FAC influence's LDS against its (absolute)
    damping."""
    sweeps = result.data["sweeps"]["kfac"]
    number = result.data.get("damping_figures", (7, 8))[0]
    return figures.damping_curves(
        {f"K-FAC influence, {t}": (sweeps[t], "-") for t in ("loss", "elbo")},
        "damping",
        f"K-FAC influence: LDS against damping (Fig. {number})",
    )


def _trak_damping_figure(curves: dict, title: str):
    """Figs. 8 and 18: LDS curves against damping relative to the mean eigenvalue."""
    return figures.damping_curves(
        curves,
        "damping / mean eigenvalue of the projected curvature (empirical Fisher; DAS: GGN)",
        title,
        x="relative_damping",
        capsize=2,
    )


def fig_damping_trak(result: StageResult):
    """Fig. 8 (Fig. 10 on a 10-class dataset): TRAK's, D-TRAK's (and DAS's and Journey-TRAK's)
    LDS against relative damping (float32, as the paper)."""
    curves = {
        f"{'JOURNEY-TRAK' if meas == 'journey' else method.upper()} ({target})": (t, "-")
        for (method, meas, target, prec), t in result.data["sweeps"]["trak"].items()
        if prec == "float32"
    }
    number = result.data.get("damping_figures", (7, 8))[1]
    return _trak_damping_figure(
        curves, f"TRAK, D-TRAK, DAS and Journey-TRAK: LDS against damping (Fig. {number})"
    )


def fig_trak_precision(result: StageResult):
    """Fig. 18: TRAK and D-TRAK for the loss with traker's float16 pipeline against float32,
    over the damping sweep."""
    curves = {
        f"{method.upper()}, {prec}": (t, "-" if prec == "float32" else ":")
        for (method, meas, target, prec), t in result.data["sweeps"]["trak"].items()
        if target == "loss" and meas != "journey"  # the paper's Fig. 18: TRAK and D-TRAK
    }
    return _trak_damping_figure(
        curves,
        "TRAK and D-TRAK in float16 (traker's default) and float32 (Fig. 18), loss LDS",
    )
