"""How attributions are judged (the paper's Sec. 4, 4.1, App. D-G): the linear datamodelling
score (eq. 13) and its upper bound, the rules that decide each claim, the protocol table,
response functions, the retraining plans and the ground-truth measurements of retrained
models. Imports nothing of :mod:`diffusion_attribution.curvature` or
:mod:`diffusion_attribution.attribution`."""
