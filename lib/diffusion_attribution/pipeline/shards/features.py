"""TRAK's, D-TRAK's and DAS's projected training gradients computed as shards of the training set.

The baselines stage's long part is the projected training gradients, one row per example
(:func:`~diffusion_attribution.attribution.trak.train_features`); the kernels and scores after
them take seconds. The rows are computed as shards of the training set
(:class:`FeatureShardTask`, :func:`run_feature_shard`), resumable per shard in
``.cache/baselines/<fingerprint>/`` (:mod:`~diffusion_attribution.pipeline.shards.phases`,
:func:`baselines_fingerprint`), and concatenated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffusion_attribution.attribution import das as das_module
from diffusion_attribution.attribution import projection
from diffusion_attribution.attribution import trak as trak_module
from diffusion_attribution.attribution.baselines import FEATURE_MEASUREMENTS
from diffusion_attribution.attribution.das import OUTPUT_MEAN, OutputMean
from diffusion_attribution.attribution.projection import Projector
from diffusion_attribution.attribution.trak import TRAIN_MEASUREMENTS, train_features
from diffusion_attribution.core.identity import code_digest, file_digest, fingerprint
from diffusion_attribution.core.io import atomic_save, load
from diffusion_attribution.core.sections import DiffusionConfig
from diffusion_attribution.diffusion import ddpm, gradients, unet
from diffusion_attribution.diffusion import measurements as measurements_module
from diffusion_attribution.diffusion.datasets import ImageDataset, pixel_levels
from diffusion_attribution.pipeline.attributed import (
    attributed_model,
    class_labels,
    measurements_of,
)
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.shards.phases import (
    cache_folder,
    run_phase,
    training_shards,
    write_seconds,
)
from diffusion_attribution.pipeline.workspace import Workspace


@dataclass(frozen=True)
class FeatureSettings:
    """What the training features depend on besides the model and the data: the
    ``influence`` section's ``train_draws``, ``seed`` and ``batch_size`` (round-off only) and
    the ``trak`` section's ``projection_dim``, ``projection`` and ``seed``."""

    train_draws: int
    seed: int
    batch_size: int
    projection_dim: int
    projection: str
    projection_seed: int


@dataclass(frozen=True)
class FeatureShardTask:
    """Projected training gradients of examples ``start:stop`` for TRAK, D-TRAK or DAS
    (``method``, :data:`~diffusion_attribution.attribution.baselines.FEATURE_MEASUREMENTS`), written to
    ``output``; ``diffusion`` is the validated section (``model_dump(mode="json")``) and
    ``settings`` a :class:`FeatureSettings` as a dict."""

    name: str
    output: str
    root: str
    diffusion: dict
    settings: dict
    method: str
    start: int
    stop: int
    threads: int = 1


def run_feature_shard(task: FeatureShardTask) -> str:
    """Compute and save one shard's training features; returns its path."""
    if Path(task.output).exists():
        return task.output
    start = time.perf_counter()
    fs = FeatureSettings(**task.settings)
    ws = Workspace(task.root, threads=task.threads)
    ws.set_threads()
    net, params = attributed_model(ws)
    dataset = ImageDataset.load(ws.path(ws.TRAIN_SET))
    diffusion = DiffusionConfig(**task.diffusion)
    measurements = measurements_of(
        schedule_of(diffusion), diffusion.variance, pixel_levels(dataset.name), timesteps=()
    )
    measurements[OUTPUT_MEAN] = OutputMean(schedule_of(diffusion))  # DAS's
    measurement = measurements[FEATURE_MEASUREMENTS[task.method]]
    projector = Projector(
        sum(p.numel() for p in params), fs.projection_dim, seed=fs.projection_seed,
        kind=fs.projection,
    )  # fmt: skip
    features = train_features(
        net,
        params,
        measurement,
        dataset.images[task.start : task.stop],
        projector,
        train_draws=fs.train_draws,
        seed=fs.seed,
        batch_size=fs.batch_size,
        first_id=task.start,
        progress=True,
        labels=class_labels(net, dataset.labels[task.start : task.stop]),
    )
    write_seconds(task.output, time.perf_counter() - start)
    atomic_save({"features": features.cpu(), "start": task.start, "stop": task.stop}, task.output)
    return task.output


def baselines_fingerprint(
    ws: Workspace, diffusion: DiffusionConfig, settings: FeatureSettings
) -> str:
    """What determines the feature shards: the bytes of the training set and the model, the
    ``diffusion`` section, the :class:`FeatureSettings` and the code that computes them."""
    values = {"diffusion": diffusion.model_dump(mode="json"), "features": asdict(settings)}
    code = code_digest(
        trak_module, das_module, projection, gradients, measurements_module, ddpm, unet,
        run_feature_shard,
    )  # fmt: skip
    return fingerprint(
        file_digest(ws.path(ws.TRAIN_SET)),
        file_digest(ws.path(ws.MODEL)),
        json.dumps(values, sort_keys=True),
        code,
    )


def sharded_train_features(
    ws: Workspace,
    *,
    diffusion: DiffusionConfig,
    settings: FeatureSettings,
    num_train: int,
    methods: Sequence[str] = tuple(TRAIN_MEASUREMENTS),
    progress: bool = True,
) -> dict[str, Tensor]:
    """TRAK's, D-TRAK's (and DAS's) (N, k) training features (method -> tensor, on the workspace's
    device) of the ``num_train`` training examples, computed as shards of
    ``DA_SHARD_EXAMPLES`` examples (default: one shard) through
    :func:`~diffusion_attribution.core.jobs.run_tasks`, resuming from finished shard files.
    Equal to :func:`~diffusion_attribution.attribution.trak.train_features` on the whole set up
    to float round-off of batching (draws depend only on (seed, example id)). ``methods``: those
    of :data:`~diffusion_attribution.attribution.baselines.FEATURE_MEASUREMENTS` to compute
    (``"das"`` too for DAS's output features)."""
    unknown = [m for m in methods if m not in FEATURE_MEASUREMENTS]
    if unknown:
        raise ValueError(
            f"no training features for methods {unknown}; one of {list(FEATURE_MEASUREMENTS)}"
        )
    folder = cache_folder(ws, "baselines", baselines_fingerprint(ws, diffusion, settings))
    shards = training_shards(num_train)
    tasks = [
        FeatureShardTask(
            f"features_{m}_{s.start:06d}_{s.stop:06d}",
            str(folder / f"features_{m}_{s.start:06d}_{s.stop:06d}.pt"),
            str(ws.root),
            diffusion.model_dump(mode="json"),
            asdict(settings),
            m,
            s.start,
            s.stop,
            ws.threads,
        )
        for m in methods
        for s in shards
    ]
    done = sum(Path(t.output).exists() for t in tasks)
    print(
        f"baselines: {len(methods)} methods x {len(shards)} training shard(s) "
        f"({done} of {len(tasks)} feature files exist) in {folder}",
        flush=True,
    )
    run_phase(ws, run_feature_shard, "baselines-features", tasks, progress)
    out = {}
    for m in methods:
        mine = [load(t.output, "feature shard") for t in tasks if t.method == m]
        if [(d["start"], d["stop"]) for d in mine] != [(s.start, s.stop) for s in shards]:
            raise ValueError(f"feature shards of {m} in {folder} do not tile the training set")
        out[m] = torch.cat([d["features"] for d in mine]).to(ws.device)
    return out
