"""K-FAC and EK-FAC fitted as factor sums over shards of the training set.

K-FAC factors are sums over rows (:mod:`~diffusion_attribution.curvature.partial_sums`): the
curvature stage (:mod:`diffusion_attribution.pipeline.stages.curvature`) fits each (Fisher,
expand / reduce) pair as factor sums over shards of the training set
(:class:`FactorShardTask`, :func:`run_factor_shard`), adds them and eigendecomposes once; an
EK-FAC variant adds a second pass of correction sums over the same shards in the combined
eigenbases. The tasks are resumable per shard in ``.cache/curvature/<fingerprint>/``
(:mod:`~diffusion_attribution.pipeline.shards.phases`, :func:`curvature_fingerprint`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_attribution.core.identity import code_digest, file_digest, fingerprint
from diffusion_attribution.core.sections import CurvatureConfig, DiffusionConfig, parse_variant
from diffusion_attribution.curvature import hooks, kfac, kronecker, layers, partial_sums, rows
from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.curvature.partial_sums import (
    CorrectionSums,
    FactorSums,
    apply_corrections,
    combine,
    to_kfac,
)
from diffusion_attribution.diffusion import ddpm, unet
from diffusion_attribution.diffusion import measurements as measurements_module
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.diffusion.measurements import DiffusionLoss
from diffusion_attribution.pipeline.attributed import attributed_model, class_labels
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.shards.phases import (
    cache_folder,
    run_phase,
    task_seconds,
    training_shards,
    write_seconds,
)
from diffusion_attribution.pipeline.workspace import Workspace


@dataclass(frozen=True)
class FactorShardTask:
    """Factor sums (``kind="factors"``) or EK-FAC correction sums (``kind="corrections"``,
    in the eigenbases of the K-FAC file ``basis``) of training examples ``start:stop`` for
    one (``fisher``, ``kfac``) pair, written to ``output``."""

    name: str
    output: str
    root: str
    diffusion: dict
    curvature: dict
    fisher: str
    kfac: str
    start: int
    stop: int
    kind: str = "factors"
    basis: str = ""
    threads: int = 1


def run_factor_shard(task: FactorShardTask) -> str:
    """Compute and save one shard's factor or correction sums; returns its path."""
    if Path(task.output).exists():
        return task.output
    start = time.perf_counter()
    ccfg = CurvatureConfig(**task.curvature)
    schedule = schedule_of(DiffusionConfig(**task.diffusion))
    ws = Workspace(task.root, threads=task.threads)
    ws.set_threads()
    net, params = attributed_model(ws)
    ids = torch.arange(task.start, task.stop)
    dataset = ImageDataset.load(ws.path(ws.TRAIN_SET))
    x0, labels = dataset.images[ids], class_labels(net, dataset.labels[ids])
    # (t, eps) depend only on (seed, example id): a shard draws its own examples' draws
    draws = DiffusionLoss(schedule).draw(x0, ids, ccfg.num_draws, ccfg.seed)
    device = ws.device
    args = (net, params, schedule, x0.to(device), draws["t"].to(device), draws["eps"].to(device))
    kw = dict(example_offset=task.start, batch_size=ccfg.batch_size, mc_seed=ccfg.seed)
    kw["labels"] = labels
    if task.kind == "factors":
        sums = hooks.factor_sums(*args, fisher=task.fisher, kfac=task.kfac, **kw)
    elif task.kind == "corrections":
        basis = KFAC.load(task.basis).to(device)
        sums = hooks.correction_sums(*args, basis, fisher=task.fisher, **kw)
    else:
        raise ValueError(f"unknown factor task kind {task.kind!r}")
    write_seconds(task.output, time.perf_counter() - start)
    sums.save(task.output)
    return task.output


def curvature_fingerprint(
    ws: Workspace, diffusion: DiffusionConfig, curvature: CurvatureConfig
) -> str:
    """What determines the factor shards: the bytes of the training set and the model, the
    ``diffusion`` and ``curvature`` parameters and the code that computes them."""
    sections = {
        "diffusion": diffusion.model_dump(mode="json"),
        "curvature": curvature.model_dump(mode="json"),
    }
    code = code_digest(
        hooks, partial_sums, layers, rows, kronecker, kfac, ddpm, measurements_module, unet,
        run_factor_shard,
    )  # fmt: skip
    return fingerprint(
        file_digest(ws.path(ws.TRAIN_SET)),
        file_digest(ws.path(ws.MODEL)),
        json.dumps(sections, sort_keys=True),
        code,
    )


def sharded_curvatures(
    ws: Workspace,
    variants: Sequence[str],
    *,
    diffusion: DiffusionConfig,
    curvature: CurvatureConfig,
    num_train: int,
    progress: bool = True,
) -> Iterator[tuple[str, KFAC]]:
    """Yield ``(variant, K-FAC or EK-FAC)`` for every variant (``"<fisher>_<kfac>"``,
    ``"ekfac_..."``) in order, fitted as factor-sum shards of ``DA_SHARD_EXAMPLES`` of the
    ``num_train`` training examples (default: one shard) through
    :func:`~diffusion_attribution.core.jobs.run_tasks`, resumable per shard in
    ``.cache/curvature/<fingerprint>/``. Variants sharing (Fisher, expand / reduce) share their
    factor sums. The sums are combined and eigendecomposed on the workspace's device in
    ``curvature.precision``, one variant at a time and within it one layer at a time, each
    layer's blocks written to ``eigh_<fisher>_<kfac>/`` in the cache folder as they are done (a
    rerun resumes there) and its sums freed (at paper scale one K-FAC of the Ho U-Net holds
    GBs): save each variant before asking for the next. ``meta["fit_seconds"]`` is the variant's tasks' summed time."""
    folder = cache_folder(ws, "curvature", curvature_fingerprint(ws, diffusion, curvature))
    shards = training_shards(num_train)
    sections = (diffusion.model_dump(mode="json"), curvature.model_dump(mode="json"))
    parsed = {v: parse_variant(v) for v in variants}
    pairs = list(dict.fromkeys((f, k) for f, k, _ in parsed.values()))
    ek_pairs = list(dict.fromkeys((f, k) for f, k, e in parsed.values() if e))
    device = ws.device

    def tasks_for(kind: str, pair_list) -> list[FactorShardTask]:
        return [
            FactorShardTask(
                f"{kind}_{f}_{k}_{s.start:06d}_{s.stop:06d}",
                str(folder / f"{kind}_{f}_{k}_{s.start:06d}_{s.stop:06d}.pt"),
                str(ws.root),
                *sections,
                f,
                k,
                s.start,
                s.stop,
                kind,
                str(basis_file(f, k)) if kind == "corrections" else "",
                ws.threads,
            )
            for f, k in pair_list
            for s in shards
        ]

    def basis_file(f: str, k: str) -> Path:
        return folder / f"kfac_{f}_{k}.pt"

    def fitted(pair) -> KFAC:
        mine = [t for t in fit_tasks if (t.fisher, t.kfac) == pair]
        sums = combine(FactorSums.load(t.output, device=device) for t in mine)
        # layer by layer, each layer's sums freed once its blocks are saved to the shard folder
        K = to_kfac(
            sums,
            meta={"batch_size": curvature.batch_size, "precision": curvature.precision},
            precision=curvature.precision,
            folder=folder / f"eigh_{pair[0]}_{pair[1]}",
            release=True,
        )
        K.meta["fit_seconds"] = task_seconds(mine)
        return K

    print(
        f"curvature: {len(pairs)} factor fit(s) x {len(shards)} training shard(s) in {folder}",
        flush=True,
    )
    fit_tasks = tasks_for("factors", pairs)
    run_phase(ws, run_factor_shard, "curvature-factors", fit_tasks, progress)
    # EK-FAC's second pass works in the combined eigenbases, saved for its tasks to read
    for pair in ek_pairs:
        if not basis_file(*pair).exists():
            fitted(pair).save(basis_file(*pair))
    corr_tasks = tasks_for("corrections", ek_pairs)
    run_phase(ws, run_factor_shard, "curvature-corrections", corr_tasks, progress)
    for v, (f, k, ekfac) in parsed.items():
        if not ekfac:
            yield v, fitted((f, k))
            continue
        mine = [t for t in corr_tasks if (t.fisher, t.kfac) == (f, k)]
        basis = KFAC.load(basis_file(f, k)).to(device)
        corr = combine(CorrectionSums.load(t.output, device=device) for t in mine)
        K = apply_corrections(basis, corr)
        fit = [t for t in fit_tasks if (t.fisher, t.kfac) == (f, k)]
        K.meta["fit_seconds"] = task_seconds(fit) + task_seconds(mine)
        yield v, K
