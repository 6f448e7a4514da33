"""The long stages' work as resumable fan-outs of independent tasks over shards of the
training set: curvature factor sums (:mod:`~diffusion_attribution.pipeline.shards.curvature`),
K-FAC influence scores (:mod:`~diffusion_attribution.pipeline.shards.influence`) and TRAK's
training features (:mod:`~diffusion_attribution.pipeline.shards.features`), on the cache folder
and the phases of tasks they share (:mod:`~diffusion_attribution.pipeline.shards.phases`)."""
