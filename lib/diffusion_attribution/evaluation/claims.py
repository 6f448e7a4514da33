"""The paper's claims, the number this run measured for each, and a verdict.

Each claim has one named function here (:func:`int8_compression`, :func:`kfac_beats_trak`,
..., :func:`damping_insensitivity`; those decided on the retrained models' own measurements,
Observations 1-3 and the counterfactual, are in
:mod:`~diffusion_attribution.evaluation.retraining_claims`) that takes the numbers its rule needs and returns the
claim's row (:func:`claim`): the paper's statement, its figure, this run's evidence and the
verdict. The rule is stated once, in that function's docstring, and the stage's prose and the
claims table both use that one function's row. A stage that tests a claim writes the row into
its metrics file (``metrics/<stage>.json``, key ``"claims"``); the ``claims`` stage collects
them (:func:`collect`) into one table (:func:`to_markdown`) and counts the verdicts
(:func:`summary_counts`). A verdict is one of "holds", "does not hold" or "inconclusive"
followed by the reason -- for a difference between two methods, :func:`verdict` on its paired
standard error (2 standard errors from 0); for a claim made of several comparisons,
:func:`verdict_all` is the one rule that combines them, and the evidence lists each part with its
own outcome.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from diffusion_attribution.evaluation.findings import PAPER_FINDINGS

if TYPE_CHECKING:
    from diffusion_attribution.evaluation.lds import LDSResult

VERDICTS = ("holds", "does not hold", "inconclusive")


def verdict(mean: float, stderr: float, z: float = 2.0) -> str:
    """For a claim "A > B" measured as a difference A - B with standard error ``stderr``:
    "holds" when the difference is more than ``z`` standard errors above 0, "does not hold"
    when more than ``z`` below, otherwise "inconclusive (within z standard errors)"."""
    if mean > z * stderr:
        return "holds"
    if mean < -z * stderr:
        return "does not hold"
    return f"inconclusive (within {z:g} standard errors of 0)"


def verdict_all(differences: Iterable[tuple[float, float]], z: float = 2.0) -> str:
    """For a claim that must hold in several comparisons (e.g. MC beats empirical Fisher with
    K-FAC expand *and* reduce, for the loss *and* the ELBO), each a (mean, stderr) difference:
    "holds" when every one holds by :func:`verdict`, "does not hold" when any is significantly
    reversed, otherwise "inconclusive"."""
    results = [verdict(m, s, z) for m, s in differences]
    if not results:
        raise ValueError("no comparisons")
    if all(r == "holds" for r in results):
        return "holds"
    reversed_ = sum(r == "does not hold" for r in results)
    if reversed_:
        return f"does not hold ({reversed_} of {len(results)} comparisons significantly reversed)"
    held = sum(r == "holds" for r in results)
    return f"inconclusive ({held} of {len(results)} comparisons hold, none is reversed)"


def claim(key: str, text: str, figure: str, evidence: str, result: str) -> dict[str, str]:
    """One claim: an id, the claim as tested, its figure, this run's number(s), the verdict and
    what the paper reports (:data:`PAPER_FINDINGS`, by id; empty for an id it lacks)."""
    if not result.startswith(VERDICTS):
        raise ValueError(f"verdict must start with one of {VERDICTS}, got {result!r}")
    return {
        "id": key,
        "claim": text,
        "figure": figure,
        "evidence": evidence,
        "verdict": result,
        "paper": PAPER_FINDINGS.get(key, ""),
    }


def collect(paths: Iterable[str | Path]) -> list[dict[str, str]]:
    """Every claim in the ``"claims"`` list of each JSON file, in file order; ids must be unique."""
    out: list[dict[str, str]] = []
    for path in paths:
        out.extend(json.loads(Path(path).read_text()).get("claims", []))
    ids = [c["id"] for c in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"claim ids appear twice: {dupes}")
    return out


def to_markdown(claims: Iterable[dict[str, str]]) -> str:
    """A Markdown table: claim | the paper reports | figure | this run | verdict (verdict in
    bold; the paper's statement from the row, or :data:`PAPER_FINDINGS` for rows without one)."""
    lines = [
        "| claim | the paper reports | figure | this run | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in claims:
        paper = c.get("paper") or PAPER_FINDINGS.get(c["id"], "")
        cells = [c["claim"], paper, c["figure"], c["evidence"], f"**{c['verdict']}**"]
        lines.append("| " + " | ".join(x.replace("|", "/") for x in cells) + " |")
    return "\n".join(lines)


def summary_counts(claims: Iterable[dict[str, str]]) -> dict[str, int]:
    """How many claims hold, do not hold and are inconclusive (by the verdict's first words)."""
    claims = list(claims)
    return {v: sum(c["verdict"].startswith(v) for c in claims) for v in VERDICTS}


def fmt(result: LDSResult) -> str:
    """A difference and its standard error as the claims print them: ``+0.123 ± 0.045``."""
    return f"{result.mean:+.3f} ± {result.stderr:.3f}"


# One function per claim of the paper. Each states its rule; the numbers it takes are measured by
# the stage named in its docstring. LDS arguments need only ``.mean`` and ``.stderr``.


def int8_compression(
    int8_mean: float, int8_min: float, svd_means: Iterable[float]
) -> dict[str, str]:
    """App. C / Fig. 6: int8 quantisation of the preconditioned query gradients keeps the ranking
    of the scores, and SVD compression does not (numbers from the ``influence`` stage).

    ``int8_mean`` and ``int8_min`` are the mean and the worst sample of the per-sample Spearman
    correlation, over the training set, between scores from int8 and from uncompressed queries;
    ``svd_means`` the mean Spearman of each SVD rank tried. Rule: "holds" when the *worst* sample
    reaches 0.99 (``int8_min >= 0.99``: the paper finds quantisation harmless, so the ranking of
    every sample, not only the average one, must be near-exact) and int8 is above every SVD rank
    (``max(svd_means) < int8_mean``: the paper finds SVD clearly worse); "does not hold"
    otherwise. There is no inconclusive outcome: the correlations are exact for this run's
    scores, not estimates with a standard error.
    """
    svd = [float(v) for v in svd_means]
    if not svd:
        raise ValueError("svd_means is empty: no SVD rank to compare int8 with")
    best_svd = max(svd)
    return claim(
        "int8",
        "int8 quantisation of the query gradients keeps the ranking of the scores (Spearman >= 0.99 for every sample), better than SVD compression at any rank tried",
        "Fig. 6",
        f"Spearman with uncompressed scores: int8 {int8_mean:.4f} (worst sample {int8_min:.4f}), best SVD rank {best_svd:.4f}",
        "holds"
        if int8_min >= 0.99 and best_svd < int8_mean
        else "does not hold (rule: int8 >= 0.99 for every sample and above every SVD rank)",
    )


def kfac_beats_trak(kfac: LDSResult, trak: LDSResult, difference: LDSResult) -> dict[str, str]:
    """Fig. 2a: K-FAC influence has a higher LDS for the loss than TRAK at TRAK's best damping
    (``evaluate`` stage).

    ``kfac`` and ``trak`` are the two LDS (only their means are printed), ``difference`` the
    paired per-query difference K-FAC - TRAK (:func:`~diffusion_attribution.evaluation.lds.paired_difference`).
    Rule: :func:`verdict` on the difference -- "holds" when it is more than 2 paired standard
    errors above 0, "does not hold" when more than 2 below, otherwise "inconclusive". The paired
    error is the right one: both methods are scored on the same queries.
    """
    return claim(
        "kfac_beats_trak",
        "K-FAC influence beats TRAK (best damping)",
        "Fig. 2a",
        f"loss LDS {kfac.mean:.3f} vs {trak.mean:.3f}; paired difference {fmt(difference)}",
        verdict(difference.mean, difference.stderr),
    )


def kfac_vs_dtrak(kfac: LDSResult, dtrak: LDSResult, difference: LDSResult) -> dict[str, str]:
    """Fig. 2a: K-FAC influence, untuned (damping 1e-8), against D-TRAK at its best damping,
    for the loss (``evaluate`` stage). The paper: K-FAC "sometimes outperforms the hand-tuned
    changes in D-TRAK".

    ``difference`` is the paired per-query difference K-FAC - D-TRAK. Rule: three outcomes by
    2 paired standard errors, the same test as every other comparison -- *ahead* ("holds") when
    the difference is more than 2 standard errors above 0, *behind* ("does not hold") when more
    than 2 below, otherwise *tied* ("inconclusive": no difference this run can resolve, which is
    not evidence of parity either).
    """
    v = verdict(difference.mean, difference.stderr)
    outcome = {"holds": "ahead", "does not hold": "behind"}.get(v, "tied")
    return claim(
        "kfac_vs_dtrak",
        "K-FAC influence, untuned, is ahead of tuned D-TRAK (the paper: sometimes); reported as ahead / tied / behind",
        "Fig. 2a",
        f"loss LDS {kfac.mean:.3f} vs {dtrak.mean:.3f}; paired difference {fmt(difference)}: {outcome}",
        {
            "ahead": "holds (ahead: more than 2 standard errors above 0)",
            "behind": "does not hold (behind: more than 2 standard errors below 0)",
            "tied": "inconclusive (tied: within 2 standard errors of 0)",
        }[outcome],
    )


def kfac_vs_method(
    key: str, label: str, kfac: LDSResult, other: LDSResult, difference: LDSResult
) -> dict[str, str]:
    """Beyond the paper (issue of the field's methods): K-FAC influence at its configured
    damping against another method (``label``) on the loss LDS (``evaluate`` stage).

    ``difference`` is the paired per-query difference K-FAC - the other. Rule: the same three
    outcomes by 2 paired standard errors as :func:`kfac_vs_dtrak` -- *ahead* ("holds"), *behind*
    ("does not hold"), *tied* ("inconclusive").
    """
    v = verdict(difference.mean, difference.stderr)
    outcome = {"holds": "ahead", "does not hold": "behind"}.get(v, "tied")
    return claim(
        key,
        f"Beyond the paper: K-FAC influence against {label}; reported as ahead / tied / behind",
        "Fig. 2a",
        f"loss LDS {kfac.mean:.3f} vs {other.mean:.3f}; paired difference {fmt(difference)}: {outcome}",
        {
            "ahead": "holds (ahead: more than 2 standard errors above 0)",
            "behind": "does not hold (behind: more than 2 standard errors below 0)",
            "tied": "inconclusive (tied: within 2 standard errors of 0)",
        }[outcome],
    )


def elbo_mloss(
    kfac_elbo: LDSResult, kfac_mloss: LDSResult, difference: LDSResult
) -> dict[str, str]:
    """Fig. 2b: K-FAC influence computed for the training loss ("m. loss") predicts the change of
    the ELBO better than K-FAC influence computed for the ELBO itself (``evaluate`` stage).

    ``kfac_elbo`` is the ELBO's LDS with ELBO scores, ``kfac_mloss`` with loss scores (sign by
    :func:`~diffusion_attribution.evaluation.lds.proxy_sign`), ``difference`` the paired per-query
    difference m. loss - ELBO. Rule: :func:`verdict` on the difference (2 paired standard
    errors).
    """
    return claim(
        "elbo_mloss",
        "Substituting the loss predicts the ELBO better than the ELBO itself",
        "Fig. 2b",
        f"ELBO LDS {kfac_mloss.mean:.3f} (m. loss) vs {kfac_elbo.mean:.3f}; paired difference {fmt(difference)}",
        verdict(difference.mean, difference.stderr),
    )


def _comparisons(comparisons: Mapping[str, LDSResult], kind: str) -> dict[str, LDSResult]:
    chosen = {k: r for k, r in comparisons.items() if kind in k}
    if not chosen:
        raise ValueError(
            f"no comparison labelled {kind!r} among {sorted(comparisons)}: the claim is not tested"
        )
    return chosen


#: How :func:`_listing` marks each part of a claim made of several comparisons.
PART_OUTCOMES = {"holds": "holds", "does not hold": "reversed"}


def _listing(comparisons: Mapping[str, LDSResult]) -> str:
    """Each comparison of a several-part claim with its own outcome by :func:`verdict`
    (holds / reversed / within 2 s.e.); :func:`verdict_all` is the rule that combines them."""
    parts = [
        f"{k} {fmt(r)} ({PART_OUTCOMES.get(verdict(r.mean, r.stderr), 'within 2 s.e.')})"
        for k, r in comparisons.items()
    ]
    return "paired differences: " + "; ".join(parts)


def mc_beats_empirical(
    comparisons: Mapping[str, LDSResult], heldout: Mapping[str, LDSResult] | None = None
) -> dict[str, str]:
    """Fig. 4: K-FAC influence with the MC Fisher (GGN^model) beats the empirical Fisher
    (GGN^loss), with K-FAC expand and reduce, for the loss and the ELBO (``evaluate`` stage).

    ``comparisons`` maps labels such as ``"loss: MC - empirical (expand)"`` to paired per-query
    LDS differences at the paper's fixed damping; the labels containing ``"MC - empirical"``
    are this claim's (others, e.g. ``"expand - reduce"``, are ignored), listed in the mapping's
    order. Rule: :func:`verdict_all` -- "holds" when every comparison holds by :func:`verdict`
    (2 paired standard errors), "does not hold" when any is significantly reversed, otherwise
    "inconclusive": the paper claims the ordering in every setting, not on average.
    ``heldout``: the same comparisons with each variant at its damping chosen on held-out
    subsets; they are reported in the evidence with their own :func:`verdict_all`, which does
    not change the verdict (the paper's comparison is at its fixed damping). The empirical
    Fisher of the verdict is the per-draw one, as the authors' code forms it; the labels
    containing ``"per-example"`` (eq. 11 as the paper writes it: each example's gradient of its
    draws' mean loss) are reported beside it and do not decide. ValueError when no label
    matches (the claim is then not tested and has no row).
    """
    chosen = _comparisons(comparisons, "MC - empirical")
    evidence = "at the fixed damping, " + _listing(chosen)
    if heldout:
        held = _comparisons(heldout, "MC - empirical")
        evidence += (
            "; at each variant's held-out damping, "
            + _listing(held)
            + f" ({verdict_all((r.mean, r.stderr) for r in held.values())})"
        )
    per_example = {k: r for k, r in comparisons.items() if "per-example" in k}
    if per_example:
        evidence += "; eq. 11 per example (not in the verdict), " + _listing(per_example)
    return claim(
        "mc_beats_empirical",
        "MC Fisher (GGN^model) beats the empirical Fisher (GGN^loss, of each draw's gradient as the authors' code forms it), with K-FAC expand and reduce, for the loss and the ELBO",
        "Fig. 4",
        evidence,
        verdict_all((r.mean, r.stderr) for r in chosen.values()),
    )


def expand_beats_reduce(comparisons: Mapping[str, LDSResult]) -> dict[str, str]:
    """Fig. 4: K-FAC expand beats K-FAC reduce, for both Fishers, for the loss and the ELBO
    (``evaluate`` stage).

    As :func:`mc_beats_empirical`, for the labels containing ``"expand - reduce"`` (e.g.
    ``"elbo: expand - reduce (MC)"``). Rule: :func:`verdict_all` over them. ValueError when no
    label matches.
    """
    chosen = _comparisons(comparisons, "expand - reduce")
    return claim(
        "expand_beats_reduce",
        "K-FAC expand beats K-FAC reduce, for both Fishers, for the loss and the ELBO",
        "Fig. 4",
        _listing(chosen),
        verdict_all((r.mean, r.stderr) for r in chosen.values()),
    )


def _all_parts(key: str, text: str, figure: str, parts: Mapping[str, LDSResult]) -> dict:
    """A claim made of several paired comparisons ``parts`` (label -> difference), decided by
    :func:`verdict_all` and listed with each part's outcome."""
    if not parts:
        raise ValueError(f"claim {key!r}: no comparison to decide it")
    return claim(
        key, text, figure, _listing(parts), verdict_all((r.mean, r.stderr) for r in parts.values())
    )


def kfac_beats_trak_elbo(parts: Mapping[str, LDSResult]) -> dict[str, str]:
    """Fig. 2b: K-FAC influence beats TRAK (best damping) for the ELBO as well as for the loss
    (``evaluate`` stage). ``parts``: the paired differences K-FAC - TRAK* on the ELBO's LDS with
    each method's ELBO scores and, where scored, with both methods' loss scores ("m. loss").
    Rule: :func:`verdict_all` over them (2 paired standard errors each)."""
    return _all_parts(
        "kfac_beats_trak_elbo",
        "K-FAC influence beats TRAK (best damping) for the ELBO as well as the loss",
        "Fig. 2b",
        parts,
    )


def tuned_kfac_vs_tuned(parts: Mapping[str, LDSResult]) -> dict[str, str]:
    """Sec. 4: with its damping tuned, K-FAC influence beats tuned TRAK and tuned D-TRAK on the
    loss (``evaluate`` stage). Every method's damping is chosen on held-out subsets and its LDS
    is evaluated on the others (two folds, cross-fitted:
    :func:`~diffusion_attribution.evaluation.lds.heldout_damping`), the same rule for all, so
    no method is tuned on its test subsets. ``parts``: the paired differences K-FAC - TRAK and
    K-FAC - D-TRAK at the held-out dampings. Rule: :func:`verdict_all` over them."""
    return _all_parts(
        "tuned_kfac_vs_tuned",
        "K-FAC influence with held-out damping beats TRAK and D-TRAK with held-out damping",
        "Sec. 4, Figs. 7, 8",
        parts,
    )


def trajectory_mloss(parts: Mapping[str, LDSResult]) -> dict[str, str]:
    """Fig. 17: as for the ELBO, the change of the sampling trajectory's log-probability is
    better predicted by K-FAC influence of the loss ("m. loss") than by K-FAC influence of the
    trajectory itself (``evaluate`` stage). ``parts``: the paired difference m. loss -
    trajectory on the trajectory's LDS. Rule: :func:`verdict_all` (here one comparison,
    2 paired standard errors)."""
    return _all_parts(
        "trajectory_mloss",
        "Substituting the loss predicts the trajectory's log-probability better than the trajectory itself",
        "Fig. 17",
        parts,
    )


def trak_float16(parts: Mapping[str, LDSResult]) -> dict[str, str]:
    """Fig. 18: traker's default float16 pipeline degrades TRAK's and D-TRAK's LDS against
    float32 (``evaluate`` stage). ``parts``: the paired differences float32 - float16 of each
    method's best-of-sweep loss LDS (each precision at its own best damping). Rule:
    :func:`verdict_all` -- "holds" only when float16 is significantly worse for both."""
    return _all_parts(
        "trak_float16",
        "traker's float16 pipeline loses LDS against float32, for TRAK and D-TRAK (best damping each)",
        "Fig. 18",
        parts,
    )


def damping_insensitivity(kfac_range: float, trak_drop: float, dtrak_drop: float) -> dict[str, str]:
    """Figs. 7, 8: K-FAC influence is insensitive to small damping, while TRAK and D-TRAK fail
    at small damping (``evaluate`` stage).

    ``kfac_range`` is max - min of K-FAC's loss LDS over the damping values <= 1e-4 of its
    sweep; ``trak_drop`` and ``dtrak_drop`` the LDS at each baseline's best damping minus the LDS
    at its smallest relative damping. Rule: "holds" when ``kfac_range < 0.05`` (within the
    0.05 standard error this pipeline targets for an LDS, i.e. flat up to noise) and both drops
    exceed 0.1 (``min(trak_drop, dtrak_drop) > 0.1``, twice that: a real failure); "does not
    hold" otherwise.
    """
    ok = kfac_range < 0.05 and min(trak_drop, dtrak_drop) > 0.1
    return claim(
        "damping",
        "K-FAC influence is insensitive to small damping; TRAK and D-TRAK fail at small damping",
        "Figs. 7, 8",
        f"K-FAC loss LDS varies by {kfac_range:.3f} over damping <= 1e-4; TRAK loses {trak_drop:.3f} and D-TRAK {dtrak_drop:.3f} from their best to their smallest damping",
        "holds" if ok else "does not hold (rule: K-FAC range < 0.05 and both TRAK drops > 0.1)",
    )


def projection_dimension(
    lds_by_dim: Mapping[str, Mapping[int, LDSResult]], differences: Mapping[str, LDSResult]
) -> dict[str, str]:
    """App. G.3.1: "We found that the projection dimension affected the best obtainable results
    significantly" -- a larger projection dimension k gives TRAK and D-TRAK a better best-of-
    sweep loss LDS (``protocol`` stage).

    ``lds_by_dim``: for ``"TRAK*"`` and ``"D-TRAK*"``, the loss LDS at its best damping at each
    k tried (all listed in the evidence); ``differences``: for the same labels, the paired LDS
    difference at the largest k tried minus at the smallest. Rule: :func:`verdict_all` over
    the two differences (2 paired standard errors each) -- "holds" when both are significantly
    positive, "does not hold" when either is significantly negative, otherwise
    "inconclusive". ValueError when a label has no difference or fewer than two k (the claim is
    then not tested and has no row).
    """
    if not differences:
        raise ValueError("claim 'projection_dimension': no comparison to decide it")
    for label in differences:
        if len(lds_by_dim.get(label, {})) < 2:
            raise ValueError(
                f"claim 'projection_dimension': {label} needs the LDS at two projection "
                f"dimensions, got {sorted(lds_by_dim.get(label, {}))}"
            )
    at_k = "; ".join(
        f"{label} "
        + ", ".join(f"{r.mean:.3f} (k = {k})" for k, r in sorted(lds_by_dim[label].items()))
        for label in differences
    )
    ks = sorted({k for label in differences for k in lds_by_dim[label]})
    return claim(
        "projection_dimension",
        "A larger TRAK projection dimension gives TRAK and D-TRAK a better best-of-sweep loss LDS",
        "App. G.3.1",
        f"loss LDS at the best damping: {at_k}; k = {ks[-1]} - k = {ks[0]}, "
        + _listing(differences),
        verdict_all((r.mean, r.stderr) for r in differences.values()),
    )
