"""What a budget setting does to the LDS, measured on a run's own ground truth (App. G.3.1).

The paper's protocol fits K-FAC with 125-250 (t, eps) draws per training example and projects
TRAK's and D-TRAK's gradients to 32768 dimensions; a run on a smaller budget uses fewer. Given
the score matrices of one method at several values of such a setting -- each value a damping
sweep (K-FAC influence: its one damping) -- and the loss measured on the retrained models,
:func:`budget_lds` gives each value's loss LDS as the ``evaluate`` stage computes it
(:func:`~diffusion_attribution.evaluation.lds.lds` of
:func:`~diffusion_attribution.evaluation.lds.predicted_changes`; the scores are loss-like, the
target the loss, so :func:`~diffusion_attribution.evaluation.lds.proxy_sign` is +1): at the
best damping of the sweep (the paper's "*", tuned on the evaluation subsets) and at the damping
chosen on held-out subsets (:func:`~diffusion_attribution.evaluation.lds.heldout_damping`), each
with its paired difference against the run's configured value on the same samples
(:func:`~diffusion_attribution.evaluation.lds.paired_difference`). :func:`budget_metrics` writes
them as plain numbers; :func:`extremes_difference` is the largest value minus the smallest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from diffusion_attribution.evaluation.lds import (
    LDSResult,
    heldout_damping,
    lds,
    paired_difference,
    predicted_changes,
)


@dataclass(frozen=True)
class BudgetPoint:
    """One value of a budget setting (e.g. 8 fit draws, or k = 2048).

    ``best``: the loss LDS at the best damping of its sweep, ``damping``; ``difference``: its
    paired difference with the configured value's ``best`` (value - configured). ``heldout``:
    the LDS at the damping chosen on held-out subsets, chosen as ``chosen`` (on fold 0, on fold
    1), and ``heldout_difference`` against the configured value's; all three ``None`` when the
    sweep has one damping (nothing to choose) or there are fewer than 4 subsets (no two
    folds)."""

    value: int
    best: LDSResult
    damping: float
    difference: LDSResult
    heldout: LDSResult | None = None
    chosen: tuple[float, float] | None = None
    heldout_difference: LDSResult | None = None


def best_of_sweep(
    scores: Mapping[float, Tensor], measured: Tensor, masks: Tensor
) -> tuple[float, LDSResult]:
    """The damping of ``scores`` (damping -> (Q_s, N), Q_s >= Q) with the highest loss LDS
    against ``measured`` (Q, M, K) on the subsets ``masks`` (M, N), and that LDS (a NaN LDS is
    never the best unless all are)."""
    if not scores:
        raise ValueError("no damping values to choose from")
    q = measured.shape[0]
    found = {d: lds(predicted_changes(s[:q], masks), measured) for d, s in scores.items()}
    best = max(found, key=lambda d: -math.inf if math.isnan(found[d].mean) else found[d].mean)
    return best, found[best]


def budget_lds(
    sweeps: Mapping[int, Mapping[float, Tensor]],
    measured: Tensor,
    masks: Tensor,
    configured: int,
) -> dict[int, BudgetPoint]:
    """A :class:`BudgetPoint` per value of the setting, in increasing order. ``sweeps``: value
    -> damping -> (Q_s, N) loss-like scores (dampings keyed as the caller reports them, e.g.
    relative to the mean eigenvalue for TRAK); ``measured`` (Q, M, K) the loss on the retrained
    models, ``masks`` (M, N) their subsets; ``configured``: the run's value, one of the keys."""
    if configured not in sweeps:
        raise ValueError(f"the configured value {configured} is not among {sorted(sweeps)}")
    folds = masks.shape[0] >= 4
    raw = {}
    for value in sorted(sweeps):
        damping, best = best_of_sweep(sweeps[value], measured, masks)
        held = (
            heldout_damping(sweeps[value], measured, masks)
            if folds and len(sweeps[value]) > 1
            else None
        )
        raw[value] = (damping, best, held)
    _, ref, ref_held = raw[configured]
    points = {}
    for value, (damping, best, held) in raw.items():
        points[value] = BudgetPoint(
            value=value,
            best=best,
            damping=damping,
            difference=paired_difference(best.per_query, ref.per_query),
            heldout=held.heldout if held else None,
            chosen=held.chosen if held else None,
            heldout_difference=(
                paired_difference(held.heldout.per_query, ref_held.heldout.per_query)
                if held and ref_held
                else None
            ),
        )
    return points


def extremes_difference(points: Mapping[int, BudgetPoint]) -> LDSResult:
    """The paired difference of the best-of-sweep LDS at the largest value minus at the
    smallest (the projection-dimension claim's comparison); ValueError with fewer than two."""
    if len(points) < 2:
        raise ValueError(f"need two values of the setting, got {sorted(points)}")
    low, high = points[min(points)], points[max(points)]
    return paired_difference(high.best.per_query, low.best.per_query)


def _pair(r: LDSResult) -> dict[str, float]:
    return {"mean": round(r.mean, 5), "stderr": round(r.stderr, 5)}


def budget_metrics(points: Mapping[int, BudgetPoint]) -> dict[str, dict]:
    """The points as JSON-ready numbers, keyed by the value as a string: ``lds``, ``stderr``,
    ``damping`` (the best of the sweep), ``difference_vs_configured`` (mean, stderr) and, where
    there is one, ``heldout`` (``lds``, ``stderr``, ``chosen`` on the two folds,
    ``difference_vs_configured``)."""
    out = {}
    for value, p in points.items():
        row = {
            "lds": round(p.best.mean, 5),
            "stderr": round(p.best.stderr, 5),
            "damping": p.damping,
            "difference_vs_configured": _pair(p.difference),
        }
        if p.heldout is not None:
            row["heldout"] = {
                "lds": round(p.heldout.mean, 5),
                "stderr": round(p.heldout.stderr, 5),
                "chosen": list(p.chosen),
                "difference_vs_configured": _pair(p.heldout_difference),
            }
        out[str(value)] = row
    return out
