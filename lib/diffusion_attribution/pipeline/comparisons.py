"""The methods the LDS figures compare, looked up in one LDS table (the ``evaluate`` stage).

:class:`Methods` names the score matrices of Figs. 2, 7, 8, 17 and 18 in a table of
:func:`~diffusion_attribution.evaluation.lds.lds_table` rows; :func:`lds_bars` gives one bar
chart's numbers, :func:`headline` the paper's comparisons at the configured damping (K-FAC
influence against TRAK*, D-TRAK* and pixel similarity on the loss, the substituted loss on the
ELBO, EK-FAC), :func:`damping_sweeps` what Figs. 7 and 8 say about the damping, and
:func:`figure_sweeps` / :func:`best_by_precision` the curves of Figs. 7, 8 and 18. Comparisons
of two methods are paired differences over the same samples
(:func:`~diffusion_attribution.evaluation.lds.paired_difference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from diffusion_attribution.attribution.scores import rows, select
from diffusion_attribution.evaluation.lds import (
    LDSResult,
    ceiling_exceedance,
    ceiling_per_sample,
    paired_difference,
)
from diffusion_attribution.evaluation.protocol import EMPIRICAL_FISHER

CORRECT, SUBSTITUTED, SIMILARITY = (
    "correct measurement",
    "substituted measurement",
    "similarity (no Hessian / no model)",
)
BOUND, REPRO = "approximate ceiling (K-seed mean)", "seed reproducibility"
#: The targets of the LDS bar charts: Figs. 2a, 2b and 17.
BAR_TARGETS = ("loss", "elbo", "trajectory")


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
        journey = self.pick(target, method="trak", measurement="journey", precision="float32")
        das = self.pick(target, method="das", measurement="output_mean", precision="float32")
        if target == "loss":
            groups.append((CORRECT, "D-TRAK*", self.pick(target, **dtrak)))
            groups.append((CORRECT, "DAS*", das))
            groups.append((CORRECT, "Journey-TRAK*", journey))
        else:
            groups += [
                (
                    SUBSTITUTED,
                    "K-FAC influence (m. loss)",
                    self.pick(target, measurement="loss", **self.kfac),
                ),
                (SUBSTITUTED, "TRAK* (m. loss)", self.pick(target, measurement="loss", **trak)),
                (SUBSTITUTED, "D-TRAK*", self.pick(target, **dtrak)),
                (SUBSTITUTED, "DAS*", das),
                (SUBSTITUTED, "Journey-TRAK*", journey),
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
            (
                SIMILARITY,
                "U-Net feature cosine",
                self.pick(target, method="feature_cos", measurement="none"),
            ),
        ]
        return [(g, label, r) for g, label, r in groups if r is not None]

    def sweep(self, target: str, **query) -> pd.DataFrame:
        """Rows of one method over its dampings, sorted by (relative) damping."""
        t = rows(self.table, target, **query)
        return t.sort_values("relative_damping" if query.get("method") != "kfac" else "damping")

    def kfac_sweep(self, target: str, measurement: str) -> pd.DataFrame:
        """K-FAC influence (the main variant and compression) over its dampings."""
        return self.sweep(
            target,
            measurement=measurement,
            **{k: v for k, v in self.kfac.items() if k != "damping"},
        )


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


def rounded(bars: dict) -> dict:
    """One bar chart's LDS and standard errors, rounded for the metrics."""
    return {
        k: {"lds": round(float(v["lds"]), 4), "stderr": round(float(v["stderr"]), 4)}
        for k, v in bars.items()
    }


@dataclass(frozen=True)
class Headline:
    """The paper's comparisons at the configured damping: the rows of K-FAC influence, TRAK*,
    D-TRAK* and pixel similarity on the loss, of K-FAC influence on the ELBO with the ELBO and
    with the loss substituted, and of EK-FAC on the loss (``None`` without it), with the paired
    differences between them."""

    kfac_l: pd.Series
    trak_l: pd.Series
    dtrak_l: pd.Series
    pixel_l: pd.Series
    kfac_e: pd.Series
    kfac_e_proxy: pd.Series
    d_trak: LDSResult
    d_dtrak: LDSResult
    d_pixel: LDSResult
    d_proxy: LDSResult
    ekfac_l: pd.Series | None
    ekfac_diffs: dict[str, LDSResult]


def headline(meth: Methods) -> Headline:
    """The paper's comparisons (:class:`Headline`) in ``meth``'s table."""
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
    ekfac_l = meth.pick(
        "loss", measurement="loss", **{**meth.kfac, "curvature": f"ekfac_{meth.main}"}
    )
    ekfac_diffs = (
        {
            "loss: EK-FAC - K-FAC": meth.diff(ekfac_l, kfac_l),
            "loss: EK-FAC - D-TRAK*": meth.diff(ekfac_l, dtrak_l),
        }
        if ekfac_l is not None
        else {}
    )
    return Headline(
        kfac_l, trak_l, dtrak_l, pixel_l, kfac_e, kfac_e_proxy,
        d_trak, d_dtrak, d_pixel, d_proxy, ekfac_l, ekfac_diffs,
    )  # fmt: skip


#: Beyond the paper: the field's other methods, each compared with K-FAC influence on the loss
#: LDS (claim id -> label, :class:`ScoreKey` fields; DAS and Journey-TRAK at their best damping, *).
FIELD_METHODS = {
    "kfac_vs_das": (
        "DAS*",
        dict(method="das", measurement="output_mean", precision="float32"),
    ),
    "kfac_vs_journey_trak": (
        "Journey-TRAK*",
        dict(method="trak", measurement="journey", precision="float32"),
    ),
    "kfac_vs_feature_nn": ("U-Net feature cosine", dict(method="feature_cos", measurement="none")),
}


def field_comparisons(meth: Methods) -> dict[str, tuple[str, pd.Series, LDSResult]]:
    """For each of :data:`FIELD_METHODS` the run scored: (label, its loss-LDS row, the paired
    difference K-FAC influence - it)."""
    kfac_l = meth.pick("loss", measurement="loss", **meth.kfac)
    out = {}
    for key, (label, query) in FIELD_METHODS.items():
        row = meth.pick("loss", **query)
        if row is not None:
            out[key] = (label, row, meth.diff(kfac_l, row))
    return out


#: The dampings K-FAC's insensitivity is judged over (Figs. 7, 8): those at most this.
SMALL_DAMPING = 1e-4


@dataclass(frozen=True)
class DampingSweeps:
    """Figs. 7, 8 on the loss: K-FAC influence's, TRAK's and D-TRAK's (float32) rows over
    their dampings; K-FAC's rows at damping <= 1e-4 (``small``) and the range of their LDS;
    TRAK's row at its smallest relative damping; how much TRAK* and D-TRAK* lose from their
    best damping to their smallest."""

    kfac: pd.DataFrame
    trak: pd.DataFrame
    dtrak: pd.DataFrame
    small: pd.DataFrame
    trak_small: pd.Series
    kfac_range: float
    trak_drop: float
    dtrak_drop: float


def damping_sweeps(meth: Methods, head: Headline) -> DampingSweeps:
    """:class:`DampingSweeps` in ``meth``'s table, against ``head``'s TRAK* and D-TRAK*."""
    kfac_sweep = meth.kfac_sweep("loss", "loss")
    trak_sweep = meth.sweep("loss", method="trak", measurement="loss", precision="float32")
    dtrak_sweep = meth.sweep("loss", method="d-trak", precision="float32")
    small = kfac_sweep[kfac_sweep.damping <= SMALL_DAMPING]
    trak_small = trak_sweep.iloc[0]
    return DampingSweeps(
        kfac_sweep,
        trak_sweep,
        dtrak_sweep,
        small,
        trak_small,
        kfac_range=float(small.lds.max() - small.lds.min()),
        trak_drop=float(head.trak_l.lds - trak_small.lds),
        dtrak_drop=float(head.dtrak_l.lds - dtrak_sweep.iloc[0].lds),
    )


def figure_sweeps(meth: Methods) -> dict:
    """The curves of Figs. 7, 8 and 18: ``"kfac"`` {target: rows} for the loss and the ELBO,
    ``"trak"`` {(method, measurement, target, precision): rows} for TRAK on the loss and the
    ELBO, D-TRAK on the loss, and DAS and Journey-TRAK (TRAK of ``"journey"``) on the loss where
    the run scored them, in float32 and float16 (DAS: float32 only)."""
    trak = {
        (method, meas, target, prec): meth.sweep(
            target, method=method, measurement=meas, precision=prec
        )
        for method, meas, target in (
            ("trak", "loss", "loss"),
            ("trak", "elbo", "elbo"),
            ("d-trak", "square_norm", "loss"),
            ("das", "output_mean", "loss"),
            ("trak", "journey", "loss"),
        )
        for prec in ("float32", "float16")
    }
    return {
        "kfac": {t: meth.kfac_sweep(t, t) for t in ("loss", "elbo")},
        "trak": {k: rows for k, rows in trak.items() if len(rows)},
    }


def best_by_precision(sweeps: dict) -> dict[str, dict[str, float]]:
    """Fig. 18: TRAK's and D-TRAK's best loss LDS over the damping sweep in float32 and in
    float16 (rounded), from :func:`figure_sweeps`."""
    precision = {}
    for method, meas in (("trak", "loss"), ("d-trak", "square_norm")):
        best = {
            prec: sweeps["trak"][(method, meas, "loss", prec)].lds.max()
            for prec in ("float32", "float16")
        }
        precision[method] = {p: round(float(v), 4) for p, v in best.items()}
    return precision


def further_comparisons(
    meth: Methods, tuned_kfac: LDSResult | None, heldout: dict[str, LDSResult]
) -> dict[str, dict[str, LDSResult]]:
    """The paired differences of the paper's claims beyond Fig. 2a's headline, by claim id of
    :mod:`diffusion_attribution.evaluation.claims` (a claim the run cannot test is left out):

    - ``kfac_beats_trak_elbo``: K-FAC influence - TRAK* on the ELBO's LDS, with ELBO scores and
      with loss scores ("m. loss");
    - ``tuned_kfac_vs_tuned``: K-FAC influence at its held-out damping (``tuned_kfac``, Fig. 4's
      main variant) - TRAK and D-TRAK at theirs (``heldout``, by :func:`heldout_rows
      <diffusion_attribution.pipeline.ablations.heldout_rows>` label), on the same two folds;
    - ``trajectory_mloss``: K-FAC influence of the loss - of the trajectory, on the
      trajectory's LDS (Fig. 17);
    - ``trak_float16``: TRAK* and D-TRAK* in float32 - in float16 (Fig. 18), each precision at
      its own best damping."""
    kfac, trak = meth.kfac, {"method": "trak", "precision": "float32"}

    def diff(label: str, a: pd.Series | None, b: pd.Series | None) -> dict[str, LDSResult]:
        return {} if a is None or b is None else {label: meth.diff(a, b)}

    elbo = diff(
        "elbo: K-FAC - TRAK*",
        meth.pick("elbo", measurement="elbo", **kfac),
        meth.pick("elbo", measurement="elbo", **trak),
    ) | diff(
        "elbo: K-FAC (m. loss) - TRAK* (m. loss)",
        meth.pick("elbo", measurement="loss", **kfac),
        meth.pick("elbo", measurement="loss", **trak),
    )
    tuned = {
        f"loss: K-FAC - {label} (held-out dampings)": paired_difference(
            tuned_kfac.per_query, heldout[f"loss: {label}"].per_query
        )
        for label in ("TRAK", "D-TRAK")
        if tuned_kfac is not None and f"loss: {label}" in heldout
    }
    trajectory = diff(
        "trajectory: K-FAC (m. loss) - K-FAC",
        meth.pick("trajectory", measurement="loss", **kfac),
        meth.pick("trajectory", measurement="trajectory", **kfac),
    )
    float16: dict[str, LDSResult] = {}
    for method, meas, label in (("trak", "loss", "TRAK*"), ("d-trak", "square_norm", "D-TRAK*")):
        float16 |= diff(
            f"loss: {label} float32 - float16",
            meth.pick("loss", method=method, measurement=meas, precision="float32"),
            meth.pick("loss", method=method, measurement=meas, precision="float16"),
        )
    found = {
        "kfac_beats_trak_elbo": elbo,
        "tuned_kfac_vs_tuned": tuned,
        "trajectory_mloss": trajectory,
        "trak_float16": float16,
    }
    return {k: v for k, v in found.items() if v}


def ceiling_metrics(measured: torch.Tensor, kfac: LDSResult) -> dict:
    """The approximate ceiling of one target (``measured`` (Q, M, K)) read per sample and
    tested on synthetic data: the quantiles of the per-sample ceilings
    (:func:`~diffusion_attribution.evaluation.lds.ceiling_per_sample`), the fraction of samples
    whose K-FAC influence LDS (``kfac.per_query``) exceeds its own, and
    :func:`~diffusion_attribution.evaluation.lds.ceiling_exceedance` at this run's shape."""
    per = ceiling_per_sample(measured)
    k = kfac.per_query.double().numpy()
    ok = np.isfinite(per) & np.isfinite(k)
    q = np.percentile(per[ok], [0, 10, 50, 90, 100]) if ok.any() else [np.nan] * 5
    return {
        "per_sample": dict(zip(("min", "p10", "median", "p90", "max"), map(float, q), strict=True)),
        "kfac_fraction_above_own": float((k[ok] > per[ok]).mean()) if ok.any() else np.nan,
        "synthetic": ceiling_exceedance(measured),
    }


def per_example_fisher_effect(lds_of: dict, differences: dict) -> dict[str, str]:
    """The measured effect of forming eq. 11 per (t, eps) draw, as the authors' code does,
    instead of per example as the paper writes it: from Fig. 4's LDS (``lds_of`` by (target,
    setting, variant)) and paired differences (``differences`` by (target, setting, label)) of
    :func:`~diffusion_attribution.pipeline.ablations.hessian_ablation`, K-FAC expand at the
    fixed damping. Empty when the run did not fit both variants."""
    parts = []
    for target in ("loss", "elbo"):
        draw = lds_of.get((target, "fixed", "empirical_expand"))
        example = lds_of.get((target, "fixed", "example_expand"))
        d = differences.get((target, "fixed", "per-draw - per-example empirical (expand)"))
        if draw is None or example is None or d is None:
            continue
        parts.append(
            f"{target} LDS per draw {draw.mean:.3f}, per example {example.mean:.3f} "
            f"(per draw - per example {d.mean:+.3f} ± {d.stderr:.3f})"
        )
    if not parts:
        return {}
    return {
        EMPIRICAL_FISHER: "K-FAC expand, fixed damping: "
        + "; ".join(parts)
        + " (Fig. 4; the MC-vs-empirical claim uses the per-draw form)"
    }
