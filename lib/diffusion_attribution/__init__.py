"""Influence functions for data attribution in diffusion models (DDPM).

The library behind the pipeline in ``dvc.yaml``; modules are named after the paper's concepts
(Mlodozeniec et al., "Influence Functions for Scalable Data Attribution in Diffusion Models").
The public API, for attributing a model of one's own (README, "Use the library"):

- measurements m(theta, x): :class:`DiffusionLoss`, :class:`ELBO`, :class:`TimestepLoss`,
  :class:`TrajectoryLogProb`, :class:`SquareNorm`, over a :class:`NoiseSchedule`;
- curvature: :func:`fit_kfac` (K-FAC of the MC or empirical Fisher, expand or reduce);
- scores: :func:`attribute` (K-FAC influence, eq. 6) keyed by :class:`ScoreKey`, returned as a
  :class:`ScoreSet`; :func:`kfac_parameters` picks the layers K-FAC covers;
- evaluation: :func:`subset_masks`, :func:`predicted_changes`,
  :func:`linear_datamodelling_score` (eq. 13).

Names are imported on first use, so ``import diffusion_attribution`` stays cheap and a stage
depends only on the modules it actually imports (:mod:`diffusion_attribution.pipeline.dvcgraph`).
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "Attributor": "attributor",
    "Attribution": "attributor",
    "FitSettings": "attributor",
    "ScoreSettings": "attributor",
    "NoiseSchedule": "diffusion.ddpm",
    "DiffusionLoss": "diffusion.measurements",
    "ELBO": "diffusion.measurements",
    "TimestepLoss": "diffusion.measurements",
    "TrajectoryLogProb": "diffusion.measurements",
    "SquareNorm": "diffusion.measurements",
    "fit_kfac": "curvature.fit",
    "KFAC": "curvature.kfac",
    "attribute": "attribution.influence",
    "ScoreKey": "attribution.scores",
    "ScoreSet": "attribution.scores",
    "kfac_parameters": "diffusion.unet",
    "subset_masks": "evaluation.lds",
    "predicted_changes": "evaluation.lds",
    "linear_datamodelling_score": "evaluation.lds",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
