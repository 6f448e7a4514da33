"""The claims decided on the retrained models' own measurements: Observations 1-3 (Sec. 4.1,
Figs. 11-15) and the counterfactual (Fig. 3).

As in :mod:`diffusion_attribution.evaluation.claims` (whose :func:`~.claims.claim` builds the
rows and whose docstring states the conventions), each claim is one function whose docstring
states its rule. Observations 1 and 2 are patterns over a grid of samples and subsets, decided
on 95% intervals of a paired bootstrap (:mod:`diffusion_attribution.evaluation.bootstrap`);
Observation 3 on a correlation range; the counterfactual on a mean over samples and its
standard error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from diffusion_attribution.evaluation.claims import claim, verdict

if TYPE_CHECKING:
    from diffusion_attribution.evaluation.bootstrap import Interval


def _interval_verdict(low: float, high: float, above: float = 0.0) -> str:
    """For a claim "statistic > ``above``" with a 95% bootstrap interval [low, high]: "holds"
    when the interval lies above, "does not hold" when it lies below, otherwise inconclusive."""
    if low > above:
        return "holds"
    if high < above:
        return "does not hold"
    return f"inconclusive (the 95% interval contains {above:g})"


def observation1(
    advantage: Mapping[str, Interval],
    kfac_upper_better: int,
    retrain_upper_better: int,
    pairs: int,
    resamples: int,
) -> dict[str, str]:
    """Observation 1 (Figs. 11, 12): the scores of l_t' for a later timestep t' > t predict the
    change of l_t as well as or better than l_t's own scores with K-FAC influence, but not under
    exact retraining (``observations`` stage).

    ``advantage`` (:func:`~diffusion_attribution.evaluation.bootstrap.observation1_bootstrap`)
    holds the mean over the pairs t < t' of LDS(l_t from l_t') - LDS(l_t from l_t) with K-FAC
    influence (``"influence"``), with exact retraining (``"retraining"``) and their
    ``"difference"``, each with a 95% interval from a paired two-way bootstrap over samples
    and subsets (``resamples`` replicates). Rule: the claim is that the later-timestep advantage
    belongs to the approximation, not to the data, so it is decided on the difference:
    "holds" when its interval lies above 0, "does not hold" when below, otherwise
    "inconclusive". The counts of pairs beating the diagonal (``kfac_upper_better``,
    ``retrain_upper_better`` of ``pairs``) are the figures' reading and are evidence only.
    """
    inf, ret, diff = (advantage[k] for k in ("influence", "retraining", "difference"))
    return claim(
        "observation1",
        "Observation 1: l_t' with t' > t predicts the change of l_t as well as or better than l_t, in the influence approximation but not under exact retraining",
        "Figs. 11, 12",
        f"mean LDS advantage of l_t' over l_t (t < t'): K-FAC influence {inf}, exact retraining {ret}, "
        f"difference {diff} (95% intervals, paired bootstrap over samples and subsets, {resamples} "
        f"resamples); t' > t beats the diagonal in {kfac_upper_better} of {pairs} pairs with K-FAC "
        f"influence, {retrain_upper_better} with exact retraining",
        _interval_verdict(diff.low, diff.high),
    )


def observation2(increase: Mapping[str, Interval], resamples: int) -> dict[str, str]:
    """Observation 2 (Figs. 13, 14): influence functions predict a decrease of the loss far more
    often than it happens; removing half the data mostly increases it (``observations`` stage).

    ``increase`` (:func:`~diffusion_attribution.evaluation.bootstrap.observation2_bootstrap`)
    holds the fraction of (sample, subset) pairs whose loss actually increases when the examples
    outside the subset are removed (``"actual_increase"``), the fraction K-FAC influence
    predicts to increase (``"predicted_increase"``) and their ``"gap"``, each with a 95%
    interval from a two-way bootstrap over samples and subsets (``resamples`` replicates).
    Rule, two parts combined as :func:`verdict_all` combines comparisons: "mostly increases"
    (the actual fraction's interval above 1/2) and "influence overestimates how often removal
    improves the loss" (the gap's interval above 0); "holds" when both hold, "does not hold"
    when either interval lies entirely on the wrong side, otherwise "inconclusive".
    """
    act, pred, gap = (increase[k] for k in ("actual_increase", "predicted_increase", "gap"))
    parts = [_interval_verdict(act.low, act.high, 0.5), _interval_verdict(gap.low, gap.high)]
    if all(p == "holds" for p in parts):
        result = "holds"
    elif any(p == "does not hold" for p in parts):
        result = "does not hold (an interval lies on the wrong side: actual <= 1/2 or gap <= 0)"
    else:
        result = "inconclusive (an interval contains its threshold)"
    return claim(
        "observation2",
        "Observation 2: influence functions predict a loss decrease far more often than it happens: removing data mostly increases the loss",
        "Figs. 13, 14",
        f"loss increases in {act.estimate:.0%} [{act.low:.0%}, {act.high:.0%}] of (sample, subset) pairs, "
        f"predicted in {pred.estimate:.0%} [{pred.low:.0%}, {pred.high:.0%}]; gap {gap} (95% intervals, "
        f"bootstrap over samples and subsets, {resamples} resamples)",
        result,
    )


def observation3(
    spearman_min: float, spearman_max: float, pearson_min: float, pearson_max: float
) -> dict[str, str]:
    """Observation 3 (Fig. 15): the ELBO ranks generated samples nearly the same whichever data
    the model was trained on (``measure`` stage).

    The arguments are the smallest and largest Spearman and Pearson correlation, over the
    samples, between the ELBO under the full-data model and under each subset model (seed 0).
    Rule: "holds" when every subset model's Spearman exceeds 0.9 (``spearman_min > 0.9``: a
    near-perfect rank agreement, so the ELBO's change under retraining is a small part of it);
    "does not hold" otherwise. The Pearson range is evidence only.
    """
    return claim(
        "observation3",
        "Observation 3: the ELBO ranks generated samples nearly the same whichever data the model was trained on",
        "Fig. 15",
        f"full model vs each subset model (seed 0), ELBO of the samples: Spearman {spearman_min:.3f} to "
        f"{spearman_max:.3f}, Pearson {pearson_min:.3f} to {pearson_max:.3f}",
        "holds"
        if spearman_min > 0.9
        else "does not hold (rule: Spearman > 0.9 for every subset model)",
    )


def counterfactual_top_removal(margins: Sequence[float]) -> dict[str, str]:
    """Fig. 3: retraining without K-FAC's top influences changes the sample's loss more than
    retraining without TRAK's or D-TRAK's (``counterfactual`` stage).

    ``margins`` has one entry per sample: the change of its loss with K-FAC's top examples
    removed minus the change with the better of TRAK's and D-TRAK's, averaged over the removed
    fractions (the samples, not the (sample, fraction) pairs, are the independent units). Rule:
    :func:`verdict` on their mean with standard error std(ddof=1) / sqrt(n) (2 standard errors);
    with one sample there is no standard error (printed as nan) and the verdict is
    "inconclusive (one sample)". ValueError when ``margins`` is empty or not finite.
    """
    m = np.asarray(margins, dtype=np.float64)
    if m.ndim != 1 or m.size == 0:
        raise ValueError(f"margins must be a non-empty sequence of floats, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"margins must be finite, got {m.tolist()}")
    n = len(m)
    mean = float(m.mean())
    se = float(m.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return claim(
        "counterfactual",
        "Removing K-FAC's top influences changes the sample's loss more than removing TRAK's or D-TRAK's",
        "Fig. 3",
        f"K-FAC minus the better of TRAK / D-TRAK (mean over fractions), mean over {n} samples: {mean:+.3f} ± {se:.3f}",
        verdict(mean, se) if math.isfinite(se) else "inconclusive (one sample)",
    )
