"""Paired bootstrap over samples and subsets for the claims that are counts (Observations 1, 2).

Observations 1 and 2 (Sec. 4.1, Figs. 11-14) are statements about *patterns* in LDS matrices and
in the signs of predicted and actual changes, not differences of two means with a standard
error. Their uncertainty comes from the finite sets of generated samples (Q) and of retraining
subsets (M), and is estimated here by resampling both with replacement, jointly: each of
``resamples`` replicates draws Q sample indices and M subset indices (a two-way bootstrap of
the (sample, subset) grid), recomputes every quantity of the claim on that grid, influence and
retraining on *the same* draws (paired), and reports the 2.5% and 97.5% percentiles
(:class:`Interval`). A rank correlation over resampled subsets uses average ranks for the
repeated subsets (:func:`spearman_rows`), as ``scipy.stats.spearmanr`` does for ties.

Statistics (the claims' rules are in :mod:`diffusion_attribution.evaluation.claims`):

* Observation 1 (:func:`observation1_bootstrap`): for every pair of timesteps t < t', the
  *advantage* of the later timestep's l_t' over the correct l_t in predicting the change of
  l_t, LDS(t; t') - LDS(t; t), averaged over the pairs: ``A_influence`` with K-FAC influence
  scores of l_t' (Fig. 11), ``A_retraining`` with the retrained models' own l_t' (Fig. 12, as
  :func:`~diffusion_attribution.evaluation.lds.retraining_proxy`: each seed's l_t' against
  the mean of l_t over the other seeds), and their difference.
* Observation 2 (:func:`observation2_bootstrap`): the fraction of (sample, subset) pairs whose
  loss actually increases when the subset's complement is removed, the fraction predicted to
  increase, and the gap actual - predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from torch import Tensor

#: Replicates of every bootstrap here.
RESAMPLES = 1000
#: The seed of the replicates' index draws.
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A statistic on the observed grid (``estimate``) and the 2.5% / 97.5% percentiles of its
    bootstrap replicates (``low``, ``high``)."""

    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {k: round(float(getattr(self, k)), digits) for k in ("estimate", "low", "high")}


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis of ``a`` and ``b`` (same shape, any leading
    axes), with average ranks for ties; NaN where either row is constant."""
    ra, rb = rankdata(a, axis=-1), rankdata(b, axis=-1)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    den = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(-1) / den, np.nan)


def grid_indices(
    num_queries: int, num_subsets: int, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(resamples, Q) sample and (resamples, M) subset indices drawn with replacement."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, num_queries, size=(resamples, num_queries)),
        rng.integers(0, num_subsets, size=(resamples, num_subsets)),
    )


def bootstrap(
    statistic: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    num_queries: int,
    num_subsets: int,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, Interval]:
    """:class:`Interval` of every named value of ``statistic(q_idx, m_idx)``: its value at
    the identity indices and the percentiles over ``resamples`` two-way resamples."""
    if num_queries < 2 or num_subsets < 2:
        raise ValueError(f"need >= 2 samples and subsets, got {num_queries} and {num_subsets}")
    point = statistic(np.arange(num_queries), np.arange(num_subsets))
    qs, ms = grid_indices(num_queries, num_subsets, resamples, seed)
    reps = [statistic(q, m) for q, m in zip(qs, ms, strict=True)]
    out = {}
    for name, value in point.items():
        values = np.array([r[name] for r in reps], dtype=np.float64)
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [2.5, 97.5]) if values.size else (np.nan, np.nan)
        out[name] = Interval(float(value), float(low), float(high))
    return out


def _np(x: Tensor) -> np.ndarray:
    return x.double().cpu().numpy()


def observation1_bootstrap(
    predicted: Mapping[str, Tensor],
    measured: Mapping[str, Tensor],
    names: Sequence[str],
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, Interval]:
    """Observation 1's statistics (module docstring) with intervals: ``"influence"``,
    ``"retraining"`` (the mean advantage of l_t' over l_t, t < t') and ``"difference"``
    (influence - retraining). ``names`` are the l_t in increasing t; ``predicted[name]`` (Q, M)
    the K-FAC influence prediction of the change from that l_t's scores, ``measured[name]``
    (Q, M, K) the retrained models' l_t (K >= 2)."""
    if len(names) < 2:
        raise ValueError(f"need at least two timesteps, got {list(names)}")
    pred = {n: _np(predicted[n]) for n in names}
    meas = {n: _np(measured[n]) for n in names}
    K = meas[names[0]].shape[2]
    if K < 2:
        raise ValueError(f"retraining needs K >= 2 seeds, got {K}")
    Q, M = pred[names[0]].shape
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]

    def statistic(q: np.ndarray, m: np.ndarray) -> dict[str, float]:
        grid = np.ix_(q, m)
        target = {n: meas[n][grid].mean(-1) for n in names}  # (Q, M): K-seed mean
        infl = {
            (a, b): np.nanmean(spearman_rows(pred[b][grid], target[a]))
            for a in names
            for b in names
        }
        others = {  # seed s's own l_t' against the mean of l_t over the other seeds
            n: [np.delete(meas[n][grid], s, axis=2).mean(2) for s in range(K)] for n in names
        }

        def retrain(a: str, b: str) -> float:
            per_seed = [spearman_rows(meas[b][grid][:, :, s], others[a][s]) for s in range(K)]
            return float(np.nanmean(np.nanmean(np.stack(per_seed), axis=0)))

        r = {(a, b): retrain(a, b) for a, b in {*pairs, *((n, n) for n in names)}}
        a_inf = float(np.mean([infl[(a, b)] - infl[(a, a)] for a, b in pairs]))
        a_ret = float(np.mean([r[(a, b)] - r[(a, a)] for a, b in pairs]))
        return {"influence": a_inf, "retraining": a_ret, "difference": a_inf - a_ret}

    return bootstrap(statistic, Q, M, resamples, seed)


def observation2_bootstrap(
    predicted: Tensor, actual: Tensor, resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, Interval]:
    """Observation 2's statistics with intervals: ``"actual_increase"`` and
    ``"predicted_increase"`` (fractions of (sample, subset) pairs with a positive actual /
    predicted change of the loss) and ``"gap"`` (actual - predicted). ``predicted`` and
    ``actual`` are (Q, M)."""
    if predicted.shape != actual.shape or predicted.ndim != 2:
        raise ValueError(
            f"predicted and actual must both be (Q, M), got {tuple(predicted.shape)} and "
            f"{tuple(actual.shape)}"
        )
    up_pred, up_act = _np(predicted) > 0, _np(actual) > 0

    def statistic(q: np.ndarray, m: np.ndarray) -> dict[str, float]:
        grid = np.ix_(q, m)
        p, a = float(up_pred[grid].mean()), float(up_act[grid].mean())
        return {"actual_increase": a, "predicted_increase": p, "gap": a - p}

    return bootstrap(statistic, *predicted.shape, resamples, seed)


__all__ = [
    "Interval",
    "RESAMPLES",
    "bootstrap",
    "grid_indices",
    "observation1_bootstrap",
    "observation2_bootstrap",
    "spearman_rows",
]
