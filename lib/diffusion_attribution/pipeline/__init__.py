"""The DVC pipeline on top of the library: the workspace's paths, one module per stage
(:mod:`~diffusion_attribution.pipeline.stages`), the resumable shards of the long stages, the
stage runner, the derived ``dvc.yaml``, figures, the offline report and the sandbox."""
