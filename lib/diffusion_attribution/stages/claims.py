"""Stage ``claims``: every claim of the paper tested by this run, in one table.

The rows are the ``claims`` entries of the metrics of the stages that test them (each decided
by its named rule in :mod:`diffusion_attribution.claims`), in the order of the pipeline.
"""

from __future__ import annotations

from .. import claims
from ..config import Config
from ..workspace import Workspace, write_json
from . import StageResult

NOTEBOOK = "12_claims.ipynb"
INPUTS = (
    "metrics/influence.json",
    "metrics/lds.json",
    "metrics/measure.json",
    "metrics/observations.json",
    "metrics/counterfactual.json",
)
OUTS = ("reports/claims.md",)
PERSIST: tuple[str, ...] = ()
FIGURES: tuple[str, ...] = ()
METRICS = ("metrics/claims.json",)

CAVEAT = (
    "The digits benchmark is far smaller than the paper's CIFAR ones (hundreds of training images, "
    "a 177k-parameter U-Net); a claim that does not hold here is a finding about this scale, not a "
    "verdict on the paper's CIFAR results."
)


def run(config: Config, ws: Workspace) -> StageResult:
    """Collect the claims into ``reports/claims.md`` and ``metrics/claims.json``."""
    found = claims.collect(ws.path(p) for p in INPUTS)
    table = claims.to_markdown(found)
    ws.out("reports/claims.md").write_text("# The paper's claims on this run\n\n" + table + "\n")
    counts = claims.summary_counts(found)
    metrics = {"counts": counts, "claims": found}
    write_json(ws.out("metrics/claims.json"), metrics)
    summary = (
        f"**This run.** {len(found)} claims: {counts['holds']} hold, {counts['does not hold']} do not hold, "
        f"{counts['inconclusive']} are inconclusive. {CAVEAT}"
    )
    return StageResult(metrics=metrics, data={"table": table}, summary=summary)
