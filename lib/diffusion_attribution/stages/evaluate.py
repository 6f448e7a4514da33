"""Stage ``evaluate``: the LDS of every method (Sec. 4, eq. 13; Figs. 2, 4, 7, 8, 17).

Every score matrix of the ``influence`` and ``baselines`` stages against every measurement it
can predict (signs from :func:`~diffusion_attribution.lds.proxy_sign`, never from the result),
on the retrained models of ``retrain`` measured by ``measure``. Comparisons of two methods are
paired differences over the same samples; the claims they decide are the named rules of
:mod:`diffusion_attribution.claims`. Next to the paper's best-of-sweep damping ("*"), the
damping chosen on held-out subsets (cross-fitted over two folds).
"""

from __future__ import annotations

import pandas as pd
import torch

from .. import claims
from ..claims import fmt
from ..config import Config, main_variant
from ..io import atomic_save
from ..lds import LDSResult, heldout_damping, lds_table, paired_difference, retraining_ceiling
from ..scores import KEY_FIELDS, ScoreKey, ScoreSet, rows, select
from ..workspace import Workspace
from . import StageResult

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
        groups = [
            (CORRECT, "K-FAC influence", self.pick(target, measurement=target, **self.kfac)),
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


def lds_bars(methods: Methods, ceilings: dict[str, LDSResult], target: str) -> dict:
    """The numbers of one LDS bar chart: {label: {"lds", "stderr"}} and the bars' groups."""
    bars = methods.bars(target)
    out = {
        label: {"lds": float(r.lds), "stderr": float(r.stderr), "group": g} for g, label, r in bars
    }
    out["exact retraining (ceiling)"] = {
        "lds": ceilings[target].mean,
        "stderr": ceilings[target].stderr,
        "group": "exact retraining",
    }
    return out


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
) -> StageResult:
    """Every LDS, the figures' numbers and the claims they decide, from scores and ground truth
    (no files: the pure part of :func:`run`)."""
    Q, M, K = next(iter(measured.values())).shape
    lds_rows = lds_table(scores, measured, masks)
    per_query = torch.stack([r.pop("per_query") for r in lds_rows])
    table = pd.DataFrame(lds_rows)
    table["relative_damping"] = [
        scores.relative_damping(ScoreKey(**{f: r[f] for f in KEY_FIELDS})) for r in lds_rows
    ]
    eig = scores.meta.get("mean_eigenvalue", {})
    ceilings = {name: retraining_ceiling(m) for name, m in measured.items()}
    main = main_variant(variants)
    meth = Methods(table, per_query, main, damping, compression)
    bars = {t: lds_bars(meth, ceilings, t) for t in ("loss", "elbo", "trajectory")}

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

    # Fig. 4: the Hessian ablation
    abl = {}
    for target in ("loss", "elbo"):
        for v in variants:
            r = meth.pick(target, measurement=target, **{**meth.kfac, "curvature": v})
            if r is not None:
                abl[(target, v)] = r
    comparisons = {
        f"{target}: {label}": meth.diff(abl[(target, a)], abl[(target, b)])
        for target in ("loss", "elbo")
        for label, (a, b) in ABLATION_PAIRS.items()
        if {(target, a), (target, b)} <= abl.keys()
    }
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
            f"{t}/{v}": {"lds": round(float(r.lds), 4), "stderr": round(float(r.stderr), 4)}
            for (t, v), r in abl.items()
        },
        "paired_differences": {
            k: {"mean": round(r.mean, 4), "stderr": round(r.stderr, 4)}
            for k, r in {
                "loss: K-FAC - TRAK*": d_trak,
                "loss: K-FAC - D-TRAK*": d_dtrak,
                "loss: K-FAC - pixel similarity": d_pixel,
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
    if mc_emp:
        found.append(claims.mc_beats_empirical(mc_emp))
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
        f"D-TRAK* {dtrak_l.lds:.3f} ± {dtrak_l.stderr:.3f}, exact retraining {ceilings['loss'].mean:.3f} ± {ceilings['loss'].stderr:.3f}. "
        f"K-FAC - TRAK* = {fmt(d_trak)}: the claim that K-FAC beats TRAK {bold(d_trak)}. "
        f"K-FAC - D-TRAK* = {fmt(d_dtrak)}: the claim that K-FAC matches or beats D-TRAK **{by_id['kfac_vs_dtrak']['verdict']}** "
        "(worse by less than 0.1 with 2 standard errors to spare).",
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
        + ". Over all of them, the paper's claim that MC beats empirical Fisher "
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
        f"exact retraining {ceilings['trajectory'].mean:.3f} ± {ceilings['trajectory'].stderr:.3f}.",
        f"*Figs. 7, 8:* K-FAC LDS (loss) over damping <= 1e-4 ranges {small.lds.min():.3f} to {small.lds.max():.3f}; "
        f"TRAK at the smallest relative damping ({trak_small.relative_damping:g}) reaches {trak_small.lds:.3f}, against {trak_l.lds:.3f} at its best ({trak_l.relative_damping:g}); "
        f"D-TRAK {dtrak_sweep.iloc[0].lds:.3f} against {dtrak_l.lds:.3f} at its best ({dtrak_l.relative_damping:g})."
        + "".join(
            f" **{name}'s best damping is at the edge of the sweep**: its optimum may lie beyond it, so {name}* may be underestimated."
            for name, best, grid in (("TRAK", trak_l, trak_sweep), ("D-TRAK", dtrak_l, dtrak_sweep))
            if best.relative_damping in (grid.relative_damping.min(), grid.relative_damping.max())
        ),
    ]
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
    return StageResult(
        metrics=metrics,
        tables={
            "lds": table,
            "heldout": heldout,
            "ablation": pd.DataFrame(
                {k: {"mean": r.mean, "stderr": r.stderr} for k, r in comparisons.items()}
            ).T.round(4),
            **{f"bars_{t}": pd.DataFrame(_rounded(b)).T for t, b in bars.items()},
        },
        data={
            "per_query": per_query,
            "bars": bars,
            "ablation": {k: (float(r.lds), float(r.stderr)) for k, r in abl.items()},
            "variants": variants,
            "sweeps": sweeps,
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
    )
    result.tables["lds"].to_csv(ws.out(ws.LDS_TABLE), index=False)
    atomic_save(
        {"per_query": result.data["per_query"]}, ws.out("outputs/evaluate/lds_per_query.pt")
    )
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
    from ..figures import lds_bars

    return lds_bars(result.data["bars"][target], FIG2_TITLES[target], result.data["shape"])


def fig_hessian_ablation(result: StageResult):
    """Fig. 4: MC vs empirical Fisher x K-FAC expand vs reduce, loss and ELBO."""
    from ..figures import grouped_bars

    return grouped_bars(
        result.data["ablation"],
        ["loss", "elbo"],
        list(result.data["variants"]),
        VARIANT_NAMES,
        "Hessian approximation ablation (Fig. 4)",
    )


def fig_damping_kfac(result: StageResult):
    """Fig. 7: K-FAC influence's LDS against its (absolute) damping."""
    from ..figures import damping_curves

    sweeps = result.data["sweeps"]["kfac"]
    return damping_curves(
        {f"K-FAC influence, {t}": (sweeps[t], "-") for t in ("loss", "elbo")},
        "damping",
        "K-FAC influence: LDS against damping (Fig. 7)",
    )


def fig_damping_trak(result: StageResult):
    """Fig. 8: TRAK's and D-TRAK's LDS against relative damping, float32 and float16."""
    from ..figures import damping_curves

    curves = {
        f"{method.upper()} ({target}, {prec})": (t, "-" if prec == "float32" else ":")
        for (method, _, target, prec), t in result.data["sweeps"]["trak"].items()
    }
    return damping_curves(
        curves,
        "damping / mean eigenvalue of the projected empirical Fisher",
        "TRAK and D-TRAK: LDS against damping (Fig. 8)",
        x="relative_damping",
        capsize=2,
    )
