"""The paper's claims, the number this run measured for each, and a verdict.

Each stage that tests a claim writes it into its metrics file (``metrics/<stage>.json``, key
``"claims"``) with :func:`claim`; the ``claims`` stage collects them (:func:`collect`) into one
table (:func:`to_markdown`). A verdict is one of "holds", "does not hold" or "inconclusive"
followed by the reason, decided by a rule stated where the claim is tested -- for a difference
between two methods, :func:`verdict` on its paired standard error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

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


def verdict_matches(mean: float, stderr: float, margin: float = 0.1, z: float = 2.0) -> str:
    """For a claim "A matches or beats B", measured as A - B: "holds" when A - B > -margin with
    z standard errors to spare, "does not hold" when A is significantly worse (A - B < -z se),
    otherwise "inconclusive" (too few samples to tell a tie from a loss)."""
    if mean - z * stderr > -margin:
        return "holds"
    if mean < -z * stderr:
        return "does not hold"
    return f"inconclusive (not significantly worse, but not within {margin:g} either)"


def claim(key: str, text: str, figure: str, evidence: str, result: str) -> dict[str, str]:
    """One claim: an id, the paper's statement, its figure, this run's number(s), the verdict."""
    if not result.startswith(VERDICTS):
        raise ValueError(f"verdict must start with one of {VERDICTS}, got {result!r}")
    return {"id": key, "claim": text, "figure": figure, "evidence": evidence, "verdict": result}


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
    """A Markdown table: claim | figure | this run | verdict (verdict in bold)."""
    lines = ["| claim | figure | this run | verdict |", "|---|---|---|---|"]
    for c in claims:
        cells = [c["claim"], c["figure"], c["evidence"], f"**{c['verdict']}**"]
        lines.append("| " + " | ".join(x.replace("|", "/") for x in cells) + " |")
    return "\n".join(lines)
