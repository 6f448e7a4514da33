"""The ``evaluate`` stage's summary in prose, with this run's numbers: Figs. 2a, 2b, 4, 7, 8,
17, the pixel similarity, EK-FAC, the held-out damping and the seed design, each with the
verdict of the claim it tests."""

from __future__ import annotations

import pandas as pd

from diffusion_attribution.evaluation import claims
from diffusion_attribution.evaluation.claims import fmt
from diffusion_attribution.evaluation.lds import LDSResult
from diffusion_attribution.pipeline.comparisons import DampingSweeps, Headline

#: Largest standard error of a plotted LDS this pipeline aims for.
TARGET_STDERR = 0.05


def bold(r: LDSResult) -> str:
    """The verdict on a paired difference, in bold."""
    return f"**{claims.verdict(r.mean, r.stderr)}**"


def summary_lines(
    shape: tuple[int, int, int],
    max_se: float,
    head: Headline,
    sweep: DampingSweeps,
    bounds: dict[str, LDSResult],
    repro: dict[str, LDSResult],
    comparisons: dict[str, LDSResult],
    comp_all: dict,
    held_rows: dict[str, dict],
    traj: dict,
    found: list[dict],
    damping: float,
) -> list[str]:
    """The summary's paragraphs with this run's numbers: Figs. 2a, 2b, 4, 7, 8, 17, the pixel
    similarity, EK-FAC and the held-out damping."""
    Q, M, K = shape
    kfac_l, trak_l, dtrak_l, pixel_l = head.kfac_l, head.trak_l, head.dtrak_l, head.pixel_l
    kfac_e, kfac_e_proxy, ekfac_l = head.kfac_e, head.kfac_e_proxy, head.ekfac_l
    d_trak, d_dtrak, d_pixel, d_proxy = head.d_trak, head.d_dtrak, head.d_pixel, head.d_proxy
    ekfac_diffs = head.ekfac_diffs
    small, trak_small = sweep.small, sweep.trak_small
    trak_sweep, dtrak_sweep = sweep.trak, sweep.dtrak
    mc_emp = any("MC - empirical" in k for k in comparisons)
    exp_red = any("expand - reduce" in k for k in comparisons)
    by_id = {c["id"]: c for c in found}
    lines = [
        f"**This run.** {Q} samples, M = {M} subsets x K = {K} seeds; the largest standard error of a plotted LDS is {max_se:.3f}"
        + (
            f" (target <= {TARGET_STDERR:g} met)."
            if max_se <= TARGET_STDERR
            else f" (above the {TARGET_STDERR:g} target: more samples or subsets needed)."
        ),
        f"*Fig. 2a (loss):* K-FAC influence {kfac_l.lds:.3f} ± {kfac_l.stderr:.3f}, TRAK* {trak_l.lds:.3f} ± {trak_l.stderr:.3f}, "
        f"D-TRAK* {dtrak_l.lds:.3f} ± {dtrak_l.stderr:.3f}; the upper bound for any method scored against the mean of "
        f"K = {K} seeds is {bounds['loss'].mean:.3f} ± {bounds['loss'].stderr:.3f} (seed reproducibility, one seed predicting "
        f"the others: {repro['loss'].mean:.3f}). K-FAC - TRAK* = {fmt(d_trak)}: the claim that K-FAC beats TRAK {bold(d_trak)}. "
        f"K-FAC - D-TRAK* = {fmt(d_dtrak)}: K-FAC is **{by_id['kfac_vs_dtrak']['evidence'].rsplit(': ', 1)[-1]}** "
        "(ahead / tied / behind by 2 paired standard errors).",
        f"*Pixel similarity* (no model at all) reaches {pixel_l.lds:.3f} ± {pixel_l.stderr:.3f} (K-FAC - pixel = {fmt(d_pixel)}). "
        + {
            "holds": "K-FAC influence predicts retraining better than looking at pixel similarity.",
            "does not hold": "On this small benchmark a model-free similarity kernel predicts retraining better than K-FAC influence: the LDS here rewards 'which training images look like the sample'.",
        }.get(
            claims.verdict(d_pixel.mean, d_pixel.stderr),
            "K-FAC influence and pixel similarity cannot be told apart here.",
        ),
        f"*Fig. 2b (ELBO):* K-FAC influence with the ELBO {kfac_e.lds:.3f} ± {kfac_e.stderr:.3f}, with the loss substituted {kfac_e_proxy.lds:.3f} ± {kfac_e_proxy.stderr:.3f} "
        f"(difference {fmt(d_proxy)}): the paper's finding that the substituted loss predicts the ELBO better {bold(d_proxy)}.",
        "*Fig. 4* (positive = the paper's ordering): "
        + "; ".join(f"{k} = {fmt(r)}" for k, r in comparisons.items())
        + ". At each variant's damping chosen on held-out subsets: "
        + "; ".join(
            f"{t}: {label} = {fmt(r)}"
            for (t, setting, label), r in comp_all.items()
            if setting == "held-out"
        )
        + ". Over the comparisons at the paper's fixed damping, the paper's claim that MC beats empirical Fisher "
        + (f"**{by_id['mc_beats_empirical']['verdict']}**" if mc_emp else "was not tested")
        + ", and that expand beats reduce "
        + (f"**{by_id['expand_beats_reduce']['verdict']}**" if exp_red else "was not tested")
        + ".",
        "*Held-out damping:* "
        + "; ".join(
            f"{k} {v['held-out damping']:.3f} ± {v['stderr']:.3f} (best of sweep on the same folds {v['best of sweep']:.3f})"
            for k, v in held_rows.items()
        )
        + ". The gap between the two columns is what tuning on the test subsets adds.",
        f"*Fig. 17 (trajectory):* K-FAC influence {traj['K-FAC influence']['lds']:.3f} ± {traj['K-FAC influence']['stderr']:.3f}, "
        f"with the loss substituted {traj['K-FAC influence (m. loss)']['lds']:.3f} ± {traj['K-FAC influence (m. loss)']['stderr']:.3f}, "
        f"upper bound {bounds['trajectory'].mean:.3f} ± {bounds['trajectory'].stderr:.3f}.",
        f"*Figs. 7, 8:* K-FAC LDS (loss) over damping <= 1e-4 ranges {small.lds.min():.3f} to {small.lds.max():.3f}; "
        f"TRAK at the smallest relative damping ({trak_small.relative_damping:g}) reaches {trak_small.lds:.3f}, against {trak_l.lds:.3f} at its best ({trak_l.relative_damping:g}); "
        f"D-TRAK {dtrak_sweep.iloc[0].lds:.3f} against {dtrak_l.lds:.3f} at its best ({dtrak_l.relative_damping:g})."
        + "".join(
            f" **{name}'s best damping is at the edge of the sweep**: its optimum may lie beyond it, so {name}* may be underestimated."
            for name, best, grid in (("TRAK", trak_l, trak_sweep), ("D-TRAK", dtrak_l, dtrak_sweep))
            if best.relative_damping in (grid.relative_damping.min(), grid.relative_damping.max())
        ),
    ]
    if ekfac_diffs:
        lines.insert(
            2,
            f"*EK-FAC* (the same MC Fisher / expand with EK-FAC's eigenvalue correction, damping {damping:g}): "
            f"loss LDS {ekfac_l.lds:.3f} ± {ekfac_l.stderr:.3f}; "
            + "; ".join(f"{k.removeprefix('loss: ')} = {fmt(r)}" for k, r in ekfac_diffs.items())
            + ".",
        )
    return lines


def seed_design_line(num_models: int, indep_table: pd.DataFrame) -> str:
    """The summary's paragraph on the independent-seed check (``num_models`` models)."""
    return (
        f"*Seed design:* against {num_models} models with a seed of their own (one per subset) "
        "instead of the first shared seed's models on the same subsets, the loss LDS changes by "
        + "; ".join(
            f"{label} {r['independent - shared']:+.3f} ± {r['stderr  ']:.3f} ({r['shared seed']:.3f} -> {r['independent seeds']:.3f})"
            for label, r in indep_table.iterrows()
        )
        + ". Shared seeds (common random numbers) are the default design; this line measures what it does to the numbers."
    )


def round_tree(obj: object, digits: int = 4) -> object:
    """``obj`` with every float rounded to ``digits`` (dicts and lists walked), for metrics."""
    if isinstance(obj, dict):
        return {k: round_tree(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [round_tree(v, digits) for v in obj]
    return round(obj, digits) if isinstance(obj, float) else obj


def ceiling_line(ceiling: dict, bound: LDSResult, shape: tuple[int, int, int]) -> str:
    """The prose on the approximate ceiling of the loss LDS
    (:func:`~diffusion_attribution.pipeline.comparisons.ceiling_metrics`)."""
    Q, M, K = shape
    per, syn = ceiling["per_sample"], ceiling["synthetic"]
    return (
        f"*The approximate ceiling* ({bound.mean:.3f} for the loss) is a population bound for a "
        "Pearson correlation, applied to Spearman correlations pooled over samples. Per sample it "
        f"ranges from {per['min']:.2f} to {per['max']:.2f} (median {per['median']:.2f}); K-FAC "
        f"influence's LDS exceeds its sample's own ceiling for "
        f"{ceiling['kfac_fraction_above_own']:.0%} of the samples. On {syn['runs']} synthetic runs "
        f"of this shape (Q = {Q}, M = {M}, K = {K}, the same seed-pair correlation "
        f"{syn['seed_pair_correlation']:.2f}) a perfect predictor reaches {syn['realised']:.3f} "
        f"against an estimated ceiling of {syn['ceiling']:.3f}: it exceeds it in "
        f"{syn['fraction_runs_above']:.0%} of the runs (95th percentile of the excess "
        f"{syn['excess_p95']:+.3f}, largest {syn['excess_max']:+.3f}), and "
        f"{syn['fraction_samples_above_own']:.0%} of its samples exceed their own ceiling."
    )
