"""Scores: K-FAC influence with query batching and compression (eq. 6, Sec. 3.2, App. C), the
score sets every method writes, random projection, TRAK / D-TRAK and similarity baselines
(Sec. 4). A curvature enters only through the :class:`~diffusion_attribution.core.operators.InverseCurvature`
interface defined below this layer, so this package imports nothing of
:mod:`diffusion_attribution.curvature` or :mod:`diffusion_attribution.evaluation`."""
