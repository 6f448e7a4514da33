"""The ``evaluate`` stage's checks of its own protocol, on one LDS table (:class:`Methods`).

- :func:`hessian_ablation`: Fig. 4's Hessian approximations compared at three dampings, the
  paper's fixed one, each variant's best (tuned on the test subsets) and each variant's damping
  chosen on held-out subsets;
- :func:`heldout_rows`: next to the paper's best-of-sweep damping ("*"), the damping chosen
  on held-out subsets (cross-fitted over two folds,
  :func:`~diffusion_attribution.evaluation.lds.heldout_damping`);
- :func:`independent_seed_lds`: the LDS against models with seeds of their own instead of the
  shared seeds (common random numbers) of the default design.
"""

from __future__ import annotations

import pandas as pd
import torch

from diffusion_attribution.attribution.scores import KEY_FIELDS, ScoreKey, ScoreSet
from diffusion_attribution.evaluation.lds import (
    LDSResult,
    heldout_damping,
    lds,
    paired_difference,
    predicted_changes,
)
from diffusion_attribution.pipeline.comparisons import Methods

#: Fig. 4's comparisons: label -> (better variant by the paper, worse variant).
ABLATION_PAIRS = {
    "MC - empirical (expand)": ("mc_expand", "empirical_expand"),
    "expand - reduce (MC)": ("mc_expand", "mc_reduce"),
    "MC - empirical (reduce)": ("mc_reduce", "empirical_reduce"),
    "expand - reduce (empirical)": ("empirical_expand", "empirical_reduce"),
    # eq. 11 as written (per example) against the MC Fisher and against the per-draw form
    "MC - per-example empirical (expand)": ("mc_expand", "example_expand"),
    "per-draw - per-example empirical (expand)": ("empirical_expand", "example_expand"),
}
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


def heldout_rows(
    meth: Methods,
    scores: ScoreSet,
    measured: dict[str, torch.Tensor],
    masks: torch.Tensor,
) -> tuple[dict[str, dict], dict[str, LDSResult]]:
    """The held-out damping, chosen on one fold of subsets and evaluated on the other, against
    the best of the sweep on the same folds, for K-FAC influence (which has nothing to choose:
    its one damping), TRAK, D-TRAK, DAS and Journey-TRAK on the loss and K-FAC influence and TRAK on
    the ELBO;
    the chosen dampings relative to the mean eigenvalue where the scores have one. Returns the
    table's rows and, by the same labels, the held-out LDS with its per-query values (for
    paired comparisons)."""
    main, damping, compression = meth.main, meth.damping, meth.compression
    eig = scores.meta.get("mean_eigenvalue", {})
    held_rows, results = {}, {}
    for target, label, query in (
        (
            "loss",
            "K-FAC influence",
            dict(method="kfac", curvature=main, measurement="loss", compression=compression),
        ),
        ("loss", "TRAK", dict(method="trak", measurement="loss", precision="float32")),
        ("loss", "D-TRAK", dict(method="d-trak", measurement="square_norm", precision="float32")),
        ("loss", "DAS", dict(method="das", measurement="output_mean", precision="float32")),
        ("loss", "Journey-TRAK", dict(method="trak", measurement="journey", precision="float32")),
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
        results[f"{target}: {label}"] = r.heldout
    return held_rows, results


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
