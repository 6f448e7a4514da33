"""The bottom layer: atomic file io, content identities of expensive results, executors (in
this process, local subprocesses, SLURM through submitit) and the typed schema of
``params.yaml``. Nothing here knows about diffusion models."""
