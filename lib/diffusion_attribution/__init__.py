"""Influence functions for data attribution in diffusion models (DDPM).

The library behind the pipeline in ``dvc.yaml``; modules are named after the paper's
concepts (Mlodozieniec et al., "Influence Functions for Scalable Data Attribution in
Diffusion Models"): ``data``, ``unet``, ``ddpm``, ``train``, ``config``, ``pipeline``.
"""

__version__ = "0.1.0"
