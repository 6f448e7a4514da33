"""The DVC pipeline on top of the library: the workspace's paths, one module per stage
(:mod:`~diffusion_attribution.pipeline.stages`) with the helpers they share (the noise schedule,
the measurements attributed, the LDS comparisons, ablations and summary of ``evaluate``), the
resumable shards of the long stages, the stage runner, the derived ``dvc.yaml``, figures, the
offline report and the sandbox."""
