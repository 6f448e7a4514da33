"""Stage ``claims``: every claim of the paper tested by this run, in one table, and the run's
headline numbers.

The rows are the ``claims`` entries of the metrics of the stages that test them (each decided
by its named rule in :mod:`diffusion_attribution.evaluation.claims`), in the order of the
pipeline. ``metrics/headline.json`` (:func:`headline`) is the one file ``dvc metrics show``
prints: each method's loss LDS with its standard error, the approximate ceiling, the verdict
counts and the run time; every stage's own metrics stay in ``metrics/<stage>.json``
(``dvc metrics show metrics/lds.json``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from diffusion_attribution.core.config import Config
from diffusion_attribution.core.io import atomic_write_text
from diffusion_attribution.evaluation import claims
from diffusion_attribution.pipeline.comparisons import BOUND
from diffusion_attribution.pipeline.runner import stage_runs
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace, write_json

NOTEBOOK = "12_claims.ipynb"
INPUTS = (
    "metrics/influence.json",
    "metrics/lds.json",
    "metrics/measure.json",
    "metrics/protocol.json",
    "metrics/observations.json",
    "metrics/counterfactual.json",
)
OUTS = ("reports/claims.md",)
PERSIST: tuple[str, ...] = ()
FIGURES: tuple[str, ...] = ()
METRICS = ("metrics/claims.json", "metrics/headline.json")

#: Fig. 2a's bars whose loss LDS the headline shows, by their labels in ``metrics/lds.json``.
HEADLINE_METHODS = (
    "K-FAC influence",
    "EK-FAC influence",
    "TRAK*",
    "D-TRAK*",
    "DAS*",
    "Journey-TRAK*",
    "pixel similarity",
    "U-Net feature cosine",
)


def headline(lds: dict, counts: dict[str, int], stage_seconds: dict[str, float]) -> dict:
    """The dozen numbers a reader of this run wants first: the loss LDS of each of
    :data:`HEADLINE_METHODS` the run scored and its standard error (from the ``evaluate``
    stage's metrics ``lds``), the approximate ceiling, the verdict ``counts`` and the run
    time in minutes (the sum of ``stage_seconds``, each stage's longest run)."""
    loss = lds.get("loss", {})
    scored = [m for m in HEADLINE_METHODS if m in loss]
    return {
        "loss_lds": {m: loss[m]["lds"] for m in scored},
        "loss_lds_stderr": {m: loss[m]["stderr"] for m in scored},
        "approximate_ceiling": loss.get(BOUND, {}).get("lds"),
        "claims": dict(counts),
        "run_minutes": round(sum(stage_seconds.values()) / 60, 1),
    }


def longest_runs(root: Path) -> dict[str, float]:
    """Each stage's longest recorded run in seconds with this checkout's ``params.yaml``
    (``reports/stages/<stage>.json``, written by :mod:`~diffusion_attribution.pipeline.runner`;
    a resumed stage's short reruns do not hide the run that did the work)."""
    params = root / "params.yaml"
    sha = hashlib.sha256(params.read_bytes()).hexdigest() if params.is_file() else None
    out = {}
    for path in sorted((root / "reports" / "stages").glob("*.json")):
        runs = [r for r in stage_runs(path) if r.get("params_sha256", sha) == sha]
        seconds = [r.get("seconds") or 0.0 for r in runs]
        if seconds:
            out[path.stem] = max(seconds)
    return out


#: The smallest of the paper's settings (CIFAR-2, App. G.1-G.2): training images and U-Net
#: parameters in K-FAC's layers (Ho et al.'s CIFAR-10 model).
PAPER_NUM_TRAIN, PAPER_NUM_PARAMETERS = 5000, 35_700_000


def caveat(influence_metrics: dict) -> str:
    """What the verdicts of a run of this size say, from the ``influence`` stage's metrics
    (``num_train``, ``num_parameters``): a run smaller than the paper's smallest setting tests
    the claims at its own scale only."""
    n, p = influence_metrics.get("num_train"), influence_metrics.get("num_parameters")
    if n is None or p is None:
        return "The run's scale is unknown (no training-set size in metrics/influence.json)."
    # the attributed parameters: the U-Net's Linear / Conv2d weights, or their LoRA adapters
    size = f"{n:,} training images, {p / 1e6:.3g} M attributed parameters"
    if n < PAPER_NUM_TRAIN or p < 0.9 * PAPER_NUM_PARAMETERS:
        return (
            f"This run ({size}) is smaller than the paper's CIFAR benchmarks (CIFAR-2: "
            f"{PAPER_NUM_TRAIN:,} images, Ho et al.'s 35.7 M-parameter U-Net); a claim that does "
            "not hold here is a finding about this scale, not a verdict on the paper's CIFAR "
            "results."
        )
    return f"This run ({size}) is at the scale of the paper's CIFAR benchmarks."


def run(config: Config, ws: Workspace) -> StageResult:
    """Collect the claims into ``reports/claims.md`` and ``metrics/claims.json``."""
    found = claims.collect(ws.path(p) for p in INPUTS)
    influence = ws.path("metrics/influence.json")
    scale = caveat(json.loads(influence.read_text()) if influence.is_file() else {})
    table = claims.to_markdown(found)
    atomic_write_text(
        "# The paper's claims on this run\n\n" + scale + "\n\n" + table + "\n",
        ws.out("reports/claims.md"),
    )
    counts = claims.summary_counts(found)
    metrics = {"counts": counts, "claims": found}
    write_json(ws.out("metrics/claims.json"), metrics)
    lds_path = ws.path("metrics/lds.json")
    lds = json.loads(lds_path.read_text()) if lds_path.is_file() else {}
    write_json(ws.out("metrics/headline.json"), headline(lds, counts, longest_runs(ws.root)))
    summary = (
        f"**This run.** {len(found)} claims: {counts['holds']} hold, {counts['does not hold']} do not hold, "
        f"{counts['inconclusive']} are inconclusive. {scale}"
    )
    return StageResult(metrics=metrics, data={"table": table}, summary=summary)
