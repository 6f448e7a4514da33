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

from diffusion_attribution.attribution.scores import KEY_FIELDS, ScoreKey, ScoreSet, rows, select
from diffusion_attribution.core.config import Config, main_variant
from diffusion_attribution.core.io import atomic_save, atomic_write_text
from diffusion_attribution.evaluation import claims
from diffusion_attribution.evaluation.claims import fmt
from diffusion_attribution.evaluation.lds import (
    LDSResult,
    heldout_damping,
    lds,
    lds_table,
    lds_upper_bound,
    paired_difference,
    predicted_changes,
    seed_reproducibility,
)
from diffusion_attribution.evaluation.protocol import budget_effects, deviations
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace

NOTEBOOK = "09_evaluate.ipynb"
INPUTS = ("outputs/influence", "outputs/baselines", "outputs/measure")
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

CORRECT, SUBSTITUTED, SIMILARITY = (
    "correct measurement",
    "substituted measurement",
    "similarity (no Hessian / no model)",
)
VARIANT_NAMES = {
    "mc_expand": "MC Fisher, expand",
    "mc_reduce": "MC Fisher, reduce",
    "empirical_expand": "empirical Fisher, expand",
    "empirical_reduce": "empirical Fisher, reduce",
    "ekfac_mc_expand": "EK-FAC (MC Fisher, expand)",
}
#: Fig. 4's comparisons: label -> (better variant by the paper, worse variant).
ABLATION_PAIRS = {
    "MC - empirical (expand)": ("mc_expand", "empirical_expand"),
    "expand - reduce (MC)": ("mc_expand", "mc_reduce"),
    "MC - empirical (reduce)": ("mc_reduce", "empirical_reduce"),
    "expand - reduce (empirical)": ("empirical_expand", "empirical_reduce"),
}
#: Largest standard error of a plotted LDS this pipeline aims for.
TARGET_STDERR = 0.05


class Methods:
    """The score matrices the figures compare, looked up in one LDS table."""

    def __init__(
        self,
        table: pd.DataFrame,
        per_query: torch.Tensor,
        main: str,
        damping: float,
        compression: str,
    ):
        self.table, self.per_query = table, per_query
        self.kfac = {
            "method": "kfac",
            "curvature": main,
            "damping": damping,
            "compression": compression,
        }
        self.main, self.damping, self.compression = main, damping, compression

    def pick(self, target: str, **query) -> pd.Series | None:
        return select(self.table, target, **query)

    def result(self, row: pd.Series) -> LDSResult:
        return LDSResult(float(row.lds), float(row.stderr), self.per_query[row.name])

    def diff(self, a: pd.Series, b: pd.Series) -> LDSResult:
        """Paired LDS difference a - b over the same samples."""
        return paired_difference(self.per_query[a.name], self.per_query[b.name])

    def bars(self, target: str) -> list[tuple[str, str, pd.Series]]:
        """Fig. 2 / 17: (group, label, row) for the bars of one target measurement."""
        trak = {"method": "trak", "precision": "float32"}
        dtrak = {"method": "d-trak", "measurement": "square_norm", "precision": "float32"}
        ekfac = {**self.kfac, "curvature": "ekfac_" + self.main}
        groups = [
            (CORRECT, "K-FAC influence", self.pick(target, measurement=target, **self.kfac)),
            (CORRECT, "EK-FAC influence", self.pick(target, measurement=target, **ekfac)),
            (CORRECT, "TRAK*", self.pick(target, measurement=target, **trak)),
        ]
        if target == "loss":
            groups.append((CORRECT, "D-TRAK*", self.pick(target, **dtrak)))
        else:
            groups += [
                (
                    SUBSTITUTED,
                    "K-FAC influence (m. loss)",
                    self.pick(target, measurement="loss", **self.kfac),
                ),
                (SUBSTITUTED, "TRAK* (m. loss)", self.pick(target, measurement="loss", **trak)),
                (SUBSTITUTED, "D-TRAK*", self.pick(target, **dtrak)),
            ]
        groups += [
            (
                SIMILARITY,
                "gradient dot product",
                self.pick(target, method="grad_dot", measurement=target),
            ),
            (
                SIMILARITY,
                "gradient cosine",
                self.pick(target, method="grad_cos", measurement=target),
            ),
            (SIMILARITY, "pixel similarity", self.pick(target, method="pixel", measurement="none")),
        ]
        return [(g, label, r) for g, label, r in groups if r is not None]

    def sweep(self, target: str, **query) -> pd.DataFrame:
        """Rows of one method over its dampings, sorted by (relative) damping."""
        t = rows(self.table, target, **query)
        return t.sort_values("relative_damping" if query.get("method") != "kfac" else "damping")


BOUND, REPRO = "upper bound (K-seed mean)", "seed reproducibility"


def lds_bars(
    methods: Methods, bounds: dict[str, LDSResult], repro: dict[str, LDSResult], target: str
) -> dict:
    """The numbers of one LDS bar chart: {label: {"lds", "stderr"}} and the bars' groups."""
    bars = methods.bars(target)
    out = {
        label: {"lds": float(r.lds), "stderr": float(r.stderr), "group": g} for g, label, r in bars
    }
    for label, r in ((BOUND, bounds[target]), (REPRO, repro[target])):
        out[label] = {"lds": r.mean, "stderr": r.stderr, "group": "exact retraining"}
    return out


#: Dampings at which Fig. 4 compares the variants.
ABLATION_DAMPINGS = ("fixed", "best", "held-out")


def hessian_ablation(
    meth: Methods,
    scores: ScoreSet,
    measured: dict[str, torch.Tensor],
    masks: torch.Tensor,
    variants: tuple[str, ...],
) -> tuple[dict, dict, dict]:
    """Fig. 4 at three dampings: the paper's fixed one (``fixed``), each variant's best of its
    sweep on all subsets (``best``, the paper's protocol for the baselines, tuned on the test
    subsets) and each variant's damping chosen on held-out subsets (``held-out``,
    :func:`~diffusion_attribution.evaluation.lds.heldout_damping`). Returns the LDS per (target, setting,
    variant), the paired differences of :data:`ABLATION_PAIRS` per (target, setting) and the
    chosen dampings per (target, setting, variant)."""
    lds_of, per_query, chosen = {}, {}, {}
    for target in ("loss", "elbo"):
        for v in variants:
            kfac = {**meth.kfac, "curvature": v}
            fixed = meth.pick(target, measurement=target, **kfac)
            if fixed is None:
                continue
            sweep = meth.sweep(
                target, measurement=target, **{k: x for k, x in kfac.items() if k != "damping"}
            )
            best = sweep.loc[sweep.lds.idxmax()]
            cands = {
                k.damping: sc
                for k, sc in scores.find(
                    method="kfac", curvature=v, measurement=target, compression=meth.compression
                ).items()
            }
            held = heldout_damping(cands, measured[target], masks)
            for setting, res, d in (
                ("fixed", meth.result(fixed), meth.damping),
                ("best", meth.result(best), float(best.damping)),
                ("held-out", held.heldout, held.chosen),
            ):
                lds_of[(target, setting, v)] = res
                per_query[(target, setting, v)] = res.per_query
                chosen[(target, setting, v)] = d
    comparisons = {
        (target, setting, label): paired_difference(
            per_query[(target, setting, a)], per_query[(target, setting, b)]
        )
        for target in ("loss", "elbo")
        for setting in ABLATION_DAMPINGS
        for label, (a, b) in ABLATION_PAIRS.items()
        if (target, setting, a) in per_query and (target, setting, b) in per_query
    }
    return lds_of, comparisons, chosen


def independent_seed_lds(
    meth: Methods,
    scores: ScoreSet,
    measured: torch.Tensor,
    independent: torch.Tensor,
    masks: torch.Tensor,
) -> pd.DataFrame:
    """The independent-seed sensitivity check for the loss: each method's LDS against one
    model per subset with a seed of its own (``independent`` (Q, M')), next to its LDS against
    the first shared seed's models on the same M' subsets (``measured[:, :M', 0]``) and the
    paired difference. Both targets are single models, so the two columns differ only in the
    seed design."""
    Mi = independent.shape[1]
    rows = {}
    for _, label, row in meth.bars("loss"):
        key = ScoreKey(**{f: row[f] for f in KEY_FIELDS})
        pred = int(row.sign) * predicted_changes(scores[key][: measured.shape[0]], masks[:Mi])
        shared = lds(pred, measured[:, :Mi, 0])
        indep = lds(pred, independent)
        d = paired_difference(indep.per_query, shared.per_query)
        rows[label] = {
            "shared seed": shared.mean,
            "stderr": shared.stderr,
            "independent seeds": indep.mean,
            "stderr ": indep.stderr,
            "independent - shared": d.mean,
            "stderr  ": d.stderr,
        }
    return pd.DataFrame(rows).T


def _rounded(bars: dict) -> dict:
    return {
        k: {"lds": round(float(v["lds"]), 4), "stderr": round(float(v["stderr"]), 4)}
        for k, v in bars.items()
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
    Q, M, K = next(iter(measured.values())).shape
    lds_rows = lds_table(scores, measured, masks)
    per_query = torch.stack([r.pop("per_query") for r in lds_rows])
    table = pd.DataFrame(lds_rows)
    table["relative_damping"] = [
        scores.relative_damping(ScoreKey(**{f: r[f] for f in KEY_FIELDS})) for r in lds_rows
    ]
    eig = scores.meta.get("mean_eigenvalue", {})
    bounds = {name: lds_upper_bound(m) for name, m in measured.items()}
    repro = {name: seed_reproducibility(m) for name, m in measured.items()}
    main = main_variant(variants)
    meth = Methods(table, per_query, main, damping, compression)
    bars = {t: lds_bars(meth, bounds, repro, t) for t in ("loss", "elbo", "trajectory")}

    # held-out damping: chosen on one fold of subsets, evaluated on the other
    held_rows = {}
    for target, label, query in (
        (
            "loss",
            "K-FAC influence",
            dict(method="kfac", curvature=main, measurement="loss", compression=compression),
        ),
        ("loss", "TRAK", dict(method="trak", measurement="loss", precision="float32")),
        ("loss", "D-TRAK", dict(method="d-trak", measurement="square_norm", precision="float32")),
        (
            "elbo",
            "K-FAC influence",
            dict(method="kfac", curvature=main, measurement="elbo", compression=compression),
        ),
        ("elbo", "TRAK", dict(method="trak", measurement="elbo", precision="float32")),
    ):
        if query["method"] == "kfac":
            query["damping"] = damping  # K-FAC influence has nothing to choose
        cands = {k.damping: s for k, s in scores.find(**query).items()}
        if not cands:
            continue
        r = heldout_damping(cands, measured[target], masks)
        rel = [d / eig[query["method"]] if query["method"] in eig else d for d in r.chosen]
        held_rows[f"{target}: {label}"] = {
            "held-out damping": r.heldout.mean,
            "stderr": r.heldout.stderr,
            "best of sweep": r.best_of_sweep.mean,
            "stderr ": r.best_of_sweep.stderr,
            "chosen (fold 0, fold 1)": f"{rel[0]:.0e}, {rel[1]:.0e}",
        }
    heldout = pd.DataFrame(held_rows).T

    # Fig. 4: the Hessian ablation at the fixed, the best and the held-out damping
    abl_all, comp_all, abl_damping = hessian_ablation(meth, scores, measured, masks, variants)
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
    indep_table = (
        independent_seed_lds(meth, scores, measured["loss"], independent["loss"], masks)
        if independent
        else None
    )
    # Figs. 7, 8: damping sweeps
    kfac_sweep = meth.sweep(
        "loss", measurement="loss", **{k: v for k, v in meth.kfac.items() if k != "damping"}
    )
    trak_sweep = meth.sweep("loss", method="trak", measurement="loss", precision="float32")
    dtrak_sweep = meth.sweep("loss", method="d-trak", precision="float32")

    kfac_l = meth.pick("loss", measurement="loss", **meth.kfac)
    trak_l = meth.pick("loss", method="trak", measurement="loss", precision="float32")
    dtrak_l = meth.pick("loss", method="d-trak", measurement="square_norm", precision="float32")
    pixel_l = meth.pick("loss", method="pixel", measurement="none")
    kfac_e = meth.pick("elbo", measurement="elbo", **meth.kfac)
    kfac_e_proxy = meth.pick("elbo", measurement="loss", **meth.kfac)
    d_trak = meth.diff(kfac_l, trak_l)
    d_dtrak = meth.diff(kfac_l, dtrak_l)
    d_pixel = meth.diff(kfac_l, pixel_l)
    d_proxy = meth.diff(kfac_e_proxy, kfac_e)
    ekfac_l = meth.pick("loss", measurement="loss", **{**meth.kfac, "curvature": f"ekfac_{main}"})
    ekfac_diffs = (
        {
            "loss: EK-FAC - K-FAC": meth.diff(ekfac_l, kfac_l),
            "loss: EK-FAC - D-TRAK*": meth.diff(ekfac_l, dtrak_l),
        }
        if ekfac_l is not None
        else {}
    )
    max_se = max(  # over the plotted methods (the ceiling is not a method)
        v["stderr"] for b in bars.values() for v in b.values() if v["group"] != "exact retraining"
    )
    small = kfac_sweep[kfac_sweep.damping <= 1e-4]
    trak_small = trak_sweep.iloc[0]
    kfac_range = float(small.lds.max() - small.lds.min())
    trak_drop = float(trak_l.lds - trak_small.lds)
    dtrak_drop = float(dtrak_l.lds - dtrak_sweep.iloc[0].lds)
    mc_emp = {k: r for k, r in comparisons.items() if "MC - empirical" in k}
    exp_red = {k: r for k, r in comparisons.items() if "expand - reduce" in k}

    metrics = {
        "num_queries": Q,
        "num_subsets": M,
        "num_seeds": K,
        "loss": _rounded(bars["loss"]),
        "elbo": _rounded(bars["elbo"]),
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
            for k, r in {
                "loss: K-FAC - TRAK*": d_trak,
                "loss: K-FAC - D-TRAK*": d_dtrak,
                "loss: K-FAC - pixel similarity": d_pixel,
                **ekfac_diffs,
                "elbo: K-FAC (m. loss) - K-FAC": d_proxy,
                **comparisons,
            }.items()
        },
        "trajectory": _rounded(bars["trajectory"]),
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
    found = [
        claims.kfac_beats_trak(meth.result(kfac_l), meth.result(trak_l), d_trak),
        claims.kfac_vs_dtrak(meth.result(kfac_l), meth.result(dtrak_l), d_dtrak),
        claims.elbo_mloss(meth.result(kfac_e), meth.result(kfac_e_proxy), d_proxy),
    ]
    held_mc_emp = {
        f"{t}: {label}": r
        for (t, setting, label), r in comp_all.items()
        if setting == "held-out" and "MC - empirical" in label
    }
    if mc_emp:
        found.append(claims.mc_beats_empirical(mc_emp, held_mc_emp))
    if exp_red:
        found.append(claims.expand_beats_reduce(exp_red))
    found.append(claims.damping_insensitivity(kfac_range, trak_drop, dtrak_drop))
    metrics["claims"] = found
    by_id = {c["id"]: c for c in found}

    def bold(r: LDSResult) -> str:
        return f"**{claims.verdict(r.mean, r.stderr)}**"

    traj = bars["trajectory"]
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
    if indep_table is not None:
        lines.append(
            f"*Seed design:* against {independent['loss'].shape[1]} models with a seed of their own (one per subset) "
            "instead of the first shared seed's models on the same subsets, the loss LDS changes by "
            + "; ".join(
                f"{label} {r['independent - shared']:+.3f} ± {r['stderr  ']:.3f} ({r['shared seed']:.3f} -> {r['independent seeds']:.3f})"
                for label, r in indep_table.iterrows()
            )
            + ". Shared seeds (common random numbers) are the default design; this line measures what it does to the numbers."
        )
        metrics["independent_seeds"] = {
            label: {
                "shared": round(float(r["shared seed"]), 4),
                "independent": round(float(r["independent seeds"]), 4),
                "difference": round(float(r["independent - shared"]), 4),
                "stderr": round(float(r["stderr  "]), 4),
            }
            for label, r in indep_table.iterrows()
        }
    sweeps = {
        "kfac": {
            t: meth.sweep(
                t, measurement=t, **{k: v for k, v in meth.kfac.items() if k != "damping"}
            )
            for t in ("loss", "elbo")
        },
        "trak": {
            (method, meas, target, prec): meth.sweep(
                target, method=method, measurement=meas, precision=prec
            )
            for method, meas, target in (
                ("trak", "loss", "loss"),
                ("trak", "elbo", "elbo"),
                ("d-trak", "square_norm", "loss"),
            )
            for prec in ("float32", "float16")
        },
    }
    precision = {}
    for method, meas in (("trak", "loss"), ("d-trak", "square_norm")):
        best = {
            prec: sweeps["trak"][(method, meas, "loss", prec)].lds.max()
            for prec in ("float32", "float16")
        }
        precision[method] = {p: round(float(v), 4) for p, v in best.items()}
    metrics["precision"] = precision
    lines.append(
        "*Fig. 18:* best loss LDS over the damping sweep in float16 (traker's default pipeline: X^T X "
        "accumulated, damped and applied in float16) against float32: "
        + "; ".join(
            f"{m.upper()} {v['float16']:.3f} vs {v['float32']:.3f}" for m, v in precision.items()
        )
        + "."
    )
    return StageResult(
        metrics=metrics,
        tables={
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
            **{f"bars_{t}": pd.DataFrame(_rounded(b)).T for t, b in bars.items()},
        },
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
    gt = ws.ground_truth
    result = evaluate(
        ws.scores,
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
            "train": config.train,
            "retrain": config.retrain,
            "measure": config.measure,
            "counterfactual": config.counterfactual,
            "influence": config.influence,
            "trak": config.trak,
        },
        num_train=int(gt["masks"].shape[1]),
        effects=result.data["budget_effects"],
    )
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
    from diffusion_attribution.pipeline.figures import lds_bars

    return lds_bars(result.data["bars"][target], FIG2_TITLES[target], result.data["shape"])


def fig_hessian_ablation(result: StageResult):
    """Fig. 4: MC vs empirical Fisher x K-FAC expand vs reduce, loss and ELBO, at the paper's
    fixed damping, at each variant's best damping and at its held-out damping."""
    from diffusion_attribution.pipeline.figures import grouped_bars

    groups = [f"{t}, {setting}" for t in ("loss", "elbo") for setting in ABLATION_DAMPINGS]
    fig = grouped_bars(
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


def fig_damping_kfac(result: StageResult):
    """Fig. 7: K-FAC influence's LDS against its (absolute) damping."""
    from diffusion_attribution.pipeline.figures import damping_curves

    sweeps = result.data["sweeps"]["kfac"]
    return damping_curves(
        {f"K-FAC influence, {t}": (sweeps[t], "-") for t in ("loss", "elbo")},
        "damping",
        "K-FAC influence: LDS against damping (Fig. 7)",
    )


def _trak_damping_figure(curves: dict, title: str):
    """Figs. 8 and 18: LDS curves against damping relative to the mean eigenvalue."""
    from diffusion_attribution.pipeline.figures import damping_curves

    return damping_curves(
        curves,
        "damping / mean eigenvalue of the projected empirical Fisher",
        title,
        x="relative_damping",
        capsize=2,
    )


def fig_damping_trak(result: StageResult):
    """Fig. 8: TRAK's and D-TRAK's LDS against relative damping (float32, as the paper)."""
    curves = {
        f"{method.upper()} ({target})": (t, "-")
        for (method, _, target, prec), t in result.data["sweeps"]["trak"].items()
        if prec == "float32"
    }
    return _trak_damping_figure(curves, "TRAK and D-TRAK: LDS against damping (Fig. 8)")


def fig_trak_precision(result: StageResult):
    """Fig. 18: TRAK and D-TRAK for the loss with traker's float16 pipeline against float32,
    over the damping sweep."""
    curves = {
        f"{method.upper()}, {prec}": (t, "-" if prec == "float32" else ":")
        for (method, _, target, prec), t in result.data["sweeps"]["trak"].items()
        if target == "loss"
    }
    return _trak_damping_figure(
        curves,
        "TRAK and D-TRAK in float16 (traker's default) and float32 (Fig. 18), loss LDS",
    )
