"""K-FAC and EK-FAC of the GGN (the paper's Sec. 3.1). Uses :mod:`diffusion_attribution.diffusion`
and nothing of the attribution or evaluation layers.

The modules, each importing only those listed before it:

- :mod:`~diffusion_attribution.curvature.kronecker`: the blocks ``G (x) A`` and their
  eigendecompositions;
- :mod:`~diffusion_attribution.curvature.kfac`: the operators in the flat parameter layout,
  :class:`~diffusion_attribution.curvature.kfac.KFAC` and the dense oracle, and the
  conventions (rows, normalisation, expand / reduce) every fit follows;
- :mod:`~diffusion_attribution.curvature.rows`: the noisy rows a fit reads;
- :mod:`~diffusion_attribution.curvature.layers`: the Linear / Conv2d layers K-FAC covers, as
  hooks see them;
- :mod:`~diffusion_attribution.curvature.partial_sums`: factor and correction sums, additive
  over shards of examples, and their normalisation into a K-FAC;
- :mod:`~diffusion_attribution.curvature.hooks`: the default backend, sums by forward /
  backward hooks;
- :mod:`~diffusion_attribution.curvature.curvlinops_backend`: the reference backend,
  curvlinops 3.0.1;
- :mod:`~diffusion_attribution.curvature.fit`:
  :func:`~diffusion_attribution.curvature.fit.fit_kfac`, the entry point for either backend.
"""
