"""The pipeline's stages as library functions: ``stages.<name>.run(config, workspace)``.

Each stage module finds its inputs and places its outputs through the paths of a
:class:`~diffusion_attribution.pipeline.workspace.Workspace`, loads each input with the type that
defines it, and returns a :class:`StageResult` (its metrics, the tables and arrays its
figures are drawn from, the claims it tests and a summary in prose with this run's numbers). A
stage notebook (``notebooks/NN_<name>.ipynb``) is its parameters cell, that one call, the
figures (:mod:`diffusion_attribution.pipeline.figures`) and the prose.

Each module also declares what ``dvc.yaml`` needs to know about it: ``NOTEBOOK``, ``INPUTS``
(outputs of earlier stages it reads), ``OUTS`` (its outputs, ``PERSIST`` those that survive a
rerun because they hold resumable expensive work), ``FIGURES`` and ``METRICS``. The library
files it depends on and the parameter keys it reads are *derived* from its code
(:mod:`diffusion_attribution.pipeline.dvcgraph`), not listed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from types import ModuleType

#: Stage names in pipeline order.
NAMES = (
    "data",
    "train",
    "sample",
    "curvature",
    "influence",
    "baselines",
    "retrain",
    "measure",
    "protocol",
    "evaluate",
    "observations",
    "counterfactual",
    "claims",
)


@dataclass
class StageResult:
    """What a stage returns: ``metrics`` (also written to ``metrics/<stage>.json``),
    ``claims`` (claim dicts of :mod:`diffusion_attribution.evaluation.claims`, part of the metrics),
    ``tables`` (pandas DataFrames shown in the notebook), ``data`` (what its figures are drawn
    from) and ``summary`` (Markdown prose with this run's numbers)."""

    metrics: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    summary: str = ""

    @property
    def claims(self) -> list[dict]:
        return self.metrics.get("claims", [])


def module(name: str) -> ModuleType:
    """The module of stage ``name``."""
    if name not in NAMES:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(NAMES)}")
    return import_module(f"{__name__}.{name}")
