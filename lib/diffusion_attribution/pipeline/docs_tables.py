"""Tables of ``docs/results.md`` written from the shipped bundles (``results readme``).

:func:`findings_block` is the per-method table beside the claims: every method's LDS on each
target of each shipped profile, its held-out-damping LDS, the independent-seed check and the
counterfactual, read from the bundles' ``metrics/lds.json`` and ``metrics/counterfactual.json``.
:mod:`diffusion_attribution.pipeline.results` puts it between :data:`FINDINGS_BEGIN` and
:data:`FINDINGS_END`, and a test fails when the docs hold anything else there.
"""

from __future__ import annotations

import json
from pathlib import Path

FINDINGS_BEGIN, FINDINGS_END = "<!-- findings:begin -->", "<!-- findings:end -->"

#: The labels of ``metrics/lds.json``'s bars -> the method's key in the counterfactual's
#: ``mean_change`` (``"<key>@<fraction>"``) and in ``heldout_damping`` (``"loss: <label>"``).
COUNTERFACTUAL_KEYS = {
    "K-FAC influence": "kfac",
    "TRAK*": "trak",
    "D-TRAK*": "d-trak",
    "DAS*": "das",
    "Journey-TRAK*": "journey-trak",
    "U-Net feature cosine": "feature_cos",
}
HELDOUT_LABELS = {
    "K-FAC influence": "K-FAC influence",
    "TRAK*": "TRAK",
    "D-TRAK*": "D-TRAK",
    "DAS*": "DAS",
    "Journey-TRAK*": "Journey-TRAK",
}


def _pm(entry: dict | None) -> str:
    return "" if not entry else f"{entry['lds']:.3f} ± {entry['stderr']:.3f}"


def _profile_rows(bundle: Path) -> tuple[list[str], list[list[str]]]:
    """The header cells and the rows of one bundle's methods."""
    lds = json.loads((bundle / "metrics" / "lds.json").read_text())
    cf_path = bundle / "metrics" / "counterfactual.json"
    cf = json.loads(cf_path.read_text()).get("mean_change", {}) if cf_path.is_file() else {}
    fractions = sorted({float(k.split("@")[1]) for k in cf})
    held = lds.get("heldout_damping", {})
    indep = lds.get("independent_seeds", {})
    labels = list(dict.fromkeys([*lds["loss"], *lds.get("elbo", {})]))
    header = [
        "method",
        "loss LDS",
        "held-out damping",
        "ELBO LDS",
        "trajectory LDS",
        "shared -> independent seed",
        *(f"counterfactual {f:.0%}" for f in fractions),
    ]
    rows = []
    for label in labels:
        h = held.get(f"loss: {HELDOUT_LABELS.get(label, '')}")
        i = indep.get(label)
        key = COUNTERFACTUAL_KEYS.get(label)
        rows.append(
            [
                label,
                _pm(lds["loss"].get(label)),
                "" if h is None else f"{h['lds']:.3f} ± {h['stderr']:.3f}",
                _pm(lds.get("elbo", {}).get(label)),
                _pm(lds.get("trajectory", {}).get(label)),
                "" if i is None else f"{i['shared']:.3f} -> {i['independent']:.3f}",
                *(
                    f"{cf[f'{key}@{f:g}']:+.3f}" if key and f"{key}@{f:g}" in cf else ""
                    for f in fractions
                ),
            ]
        )
    random = [f"{cf[f'random@{f:g}']:+.3f}" if f"random@{f:g}" in cf else "" for f in fractions]
    if any(random):
        rows.append(["random removal", "", "", "", "", "", *random])
    return header, rows


def findings_block(results: Path) -> str:
    """Per shipped bundle, one Markdown table of every method (see the module docstring):
    mean ± standard error over samples; the counterfactual's change of the sample's loss,
    mean over its samples, when the top fraction is removed."""
    lines = [FINDINGS_BEGIN]
    bundles = sorted(p for p in results.iterdir() if (p / "metrics" / "lds.json").is_file())
    for bundle in bundles:
        header, rows = _profile_rows(bundle)
        lines += [
            "",
            f"`results/{bundle.name}`:",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows),
        ]
    lines += ["", FINDINGS_END]
    return "\n".join(lines)
