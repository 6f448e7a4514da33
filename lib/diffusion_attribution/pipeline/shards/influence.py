"""K-FAC influence split into jobs: blocks of queries x shards of the training set.

Score columns are independent given the preconditioned queries (eq. 6: score[q, j] is a dot
product of query q's preconditioned gradient with training example j's gradient), so the
influence stage (:mod:`diffusion_attribution.pipeline.stages.influence`) computes its score
matrices in two phases of independent tasks (:mod:`~diffusion_attribution.pipeline.shards.phases`:
inline, local subprocesses or a SLURM job array):

1. **Query blocks** (:class:`QueryBlockTask`, :func:`run_query_block`): rows ``a:b`` of the
   queries, their gradients preconditioned by every curvature and damping and compressed
   (:func:`~diffusion_attribution.attribution.influence.precondition_queries`), saved to one file. A block
   holds as many queries as fit ``DA_QUERY_BLOCK_BYTES`` (default 8 GiB) of stored
   preconditioned gradients for all score matrices together: at paper scale (35.7 M
   parameters) one query costs 36 MB per int8 matrix and 143 MB per float32 one.
2. **Score shards** (:class:`ScoreShardTask`, :func:`run_score_shard`): for one query block and
   one shard of ``DA_SHARD_EXAMPLES`` training examples (default: the whole set), the score
   columns of that shard (:func:`~diffusion_attribution.attribution.influence.score_columns`), saved to
   one file.

:func:`gather` concatenates the shards into the (Q, N) matrices. Draws depend only on (seed,
example id) and (seed, query id), so the result equals the unsharded computation up to float
round-off of batching (a test checks it).

The task files live in ``.cache/influence/<fingerprint>/``, named by a fingerprint of
everything that determines them (:func:`cache_fingerprint`: the input files' bytes, the
parameters the stage reads, the score specs and the code).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffusion_attribution.attribution import compression
from diffusion_attribution.attribution import influence as influence_module
from diffusion_attribution.attribution.compression import Quantized
from diffusion_attribution.attribution.influence import Timings, precondition_queries, score_columns
from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet
from diffusion_attribution.core.identity import code_digest, file_digest, fingerprint
from diffusion_attribution.core.io import atomic_save
from diffusion_attribution.core.sections import DiffusionConfig, InfluenceConfig
from diffusion_attribution.curvature import kfac, kronecker
from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.diffusion import ddpm, gradients, unet
from diffusion_attribution.diffusion import measurements as measurements_module
from diffusion_attribution.diffusion.datasets import ImageDataset, pixel_levels
from diffusion_attribution.pipeline.attributed import (
    attributed_model,
    class_labels,
    measurements_of,
    sample_labels,
)
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.shards.phases import (
    blocks,
    cache_folder,
    run_phase,
    timings_path,
    training_shards,
)
from diffusion_attribution.pipeline.workspace import Workspace, write_json

_FORMAT_QUERIES = "diffusion_attribution.shards.queries/1"
_FORMAT_SCORES = "diffusion_attribution.shards.scores/1"
#: Default bytes of stored preconditioned queries per block (all score matrices together).
QUERY_BLOCK_BYTES = 8 << 30


def query_bytes(specs: Sequence[ScoreKey], num_params: int, num_blocks: int) -> int:
    """Bytes one query's preconditioned gradients take for all ``specs``: P for int8, P / 2
    for int4 (plus 4 bytes of scale per parameter tensor), 4 P for float32 (``none`` and the
    reconstructed ``svd<r>``)."""
    total = 0
    for s in specs:
        if s.compression == "int8":
            total += num_params + 4 * num_blocks
        elif s.compression == "int4":
            total += math.ceil(num_params / 2) + 4 * num_blocks
        else:
            total += 4 * num_params
    return total


# ---- files ------------------------------------------------------------------------------


def save_preconditioned(
    pre: Mapping[ScoreKey, Tensor | Quantized], path: str | Path, **meta
) -> None:
    """Preconditioned (compressed) queries, atomically, as plain tensors and values
    (loadable with ``torch.load(weights_only=True)``)."""
    entries = []
    for key, q in pre.items():
        entry: dict = {"key": asdict(key)}
        if isinstance(q, Quantized):
            entry.update(
                codes=q.codes.cpu(),
                scales=q.scales.cpu(),
                bits=q.bits,
                block_sizes=list(q.block_sizes),
            )
        else:
            entry["dense"] = q.cpu()
        entries.append(entry)
    atomic_save({"format": _FORMAT_QUERIES, "entries": entries, "meta": meta}, path)


def load_preconditioned(
    path: str | Path, device: torch.device | str = "cpu"
) -> dict[ScoreKey, Tensor | Quantized]:
    """Inverse of :func:`save_preconditioned`, on ``device``."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != _FORMAT_QUERIES:
        raise ValueError(f"{path} is not a query block written by save_preconditioned")
    out: dict[ScoreKey, Tensor | Quantized] = {}
    for e in state["entries"]:
        key = ScoreKey(**e["key"])
        if "dense" in e:
            out[key] = e["dense"].to(device)
        else:
            q = Quantized(e["codes"], e["scales"], int(e["bits"]), tuple(e["block_sizes"]))
            out[key] = q.to(device)
    return out


def _save_scores(scores: Mapping[ScoreKey, Tensor], path: Path, **meta) -> None:
    keys = list(scores)
    atomic_save(
        {
            "format": _FORMAT_SCORES,
            "keys": [asdict(k) for k in keys],
            "scores": [scores[k].cpu() for k in keys],
            "meta": meta,
        },
        path,
    )


def _load_scores(path: Path) -> tuple[dict[ScoreKey, Tensor], dict]:
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != _FORMAT_SCORES:
        raise ValueError(f"{path} is not a score shard written by run_score_shard")
    keys = [ScoreKey(**d) for d in state["keys"]]
    return dict(zip(keys, state["scores"], strict=True)), state["meta"]


# ---- tasks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryBlockTask:
    """Preconditioned queries ``start:stop`` for ``specs`` (dicts of :class:`ScoreKey`),
    written to ``output``; ``root`` is the workspace, ``diffusion`` and ``influence`` the
    validated sections (``model_dump(mode="json")``), ``threads`` the task's torch threads."""

    name: str
    output: str
    root: str
    diffusion: dict
    influence: dict
    specs: tuple[dict, ...]
    start: int
    stop: int
    threads: int = 1


@dataclass(frozen=True)
class ScoreShardTask:
    """Score columns ``start:stop`` of the training set against the query block file
    ``block`` (rows ``query_start`` onwards), written to ``output``."""

    name: str
    output: str
    root: str
    diffusion: dict
    influence: dict
    block: str
    query_start: int
    start: int
    stop: int
    threads: int = 1


def _context(task):
    """A task's settings, workspace, training set, model, its K-FAC parameters and every
    measurement attributed."""
    icfg = InfluenceConfig(**task.influence)
    ws = Workspace(task.root, threads=task.threads)
    ws.set_threads()
    net, params = attributed_model(ws)
    dataset = ImageDataset.load(ws.path(ws.TRAIN_SET))
    diffusion = DiffusionConfig(**task.diffusion)
    measurements = measurements_of(
        schedule_of(diffusion), diffusion.variance, pixel_levels(dataset.name), icfg.timesteps
    )
    return icfg, ws, dataset, net, params, measurements


def run_query_block(task: QueryBlockTask) -> str:
    """Compute and save one query block (module docstring, phase 1); returns its path."""
    if Path(task.output).exists():
        return task.output
    start = time.perf_counter()
    icfg, ws, _, net, params, measurements = _context(task)
    specs = [ScoreKey(**d) for d in task.specs]
    curvatures = {
        v: KFAC.load(ws.path(ws.CURVATURE.format(variant=v))).to(ws.device)
        for v in dict.fromkeys(s.curvature for s in specs)
    }
    samples = torch.load(ws.path(ws.SAMPLES), weights_only=True)
    rows = slice(task.start, task.stop)
    timings = Timings()
    pre = precondition_queries(
        net,
        params,
        samples["images"][rows],
        measurements,
        curvatures,
        specs,
        query_draws=icfg.query_draws,
        seed=icfg.seed,
        query_ids=torch.arange(task.start, task.stop),
        query_trajectories=samples["trajectory"][:, rows],  # (T + 1, Q, C, H, W)
        batch_size=icfg.batch_size,
        timings=timings,
        progress=True,
        query_labels=class_labels(net, sample_labels(samples, rows)),
    )
    # the timings beside the block (read without loading GBs of queries), then the block
    write_json(timings_path(task.output), asdict(timings))
    save_preconditioned(
        pre, task.output, start=task.start, stop=task.stop, seconds=time.perf_counter() - start
    )
    return task.output


def run_score_shard(task: ScoreShardTask) -> str:
    """Compute and save the score columns of one (query block, training shard) pair (module
    docstring, phase 2); returns its path."""
    if Path(task.output).exists():
        return task.output
    start = time.perf_counter()
    icfg, _, dataset, net, params, measurements = _context(task)
    pre = load_preconditioned(task.block, device=next(net.parameters()).device)
    timings = Timings()
    scores = score_columns(
        net,
        params,
        dataset.images,
        pre,
        train_measurement=measurements["loss"],
        train_draws=icfg.train_draws,
        seed=icfg.seed,
        columns=range(task.start, task.stop),
        batch_size=icfg.batch_size,
        timings=timings,
        progress=True,
        train_labels=class_labels(net, dataset.labels),
    )
    del pre
    _save_scores(
        scores,
        Path(task.output),
        query_start=task.query_start,
        start=task.start,
        stop=task.stop,
        timings=asdict(timings),
        seconds=time.perf_counter() - start,
    )
    return task.output


# ---- the whole computation ------------------------------------------------------------------


def cache_fingerprint(
    ws: Workspace,
    diffusion: DiffusionConfig,
    influence: InfluenceConfig,
    specs: Sequence[ScoreKey],
) -> str:
    """What determines the shard files (module docstring): the bytes of the training set,
    the model, the samples and every curvature file used (which stand for the ``curvature``
    parameters), the ``diffusion`` and ``influence`` parameters, the specs and the code that
    computes them."""
    files = [ws.path(ws.TRAIN_SET), ws.path(ws.MODEL), ws.path(ws.SAMPLES)]
    files += [ws.path(ws.CURVATURE.format(variant=v)) for v in sorted({s.curvature for s in specs})]
    sections = {
        "diffusion": diffusion.model_dump(mode="json"),
        "influence": influence.model_dump(mode="json"),
    }
    code = code_digest(
        compression, kfac, ddpm, gradients, influence_module, kronecker, measurements_module,
        unet, run_query_block, run_score_shard, save_preconditioned, load_preconditioned,
    )  # fmt: skip
    return fingerprint(
        *(file_digest(f) for f in files),
        json.dumps(sections, sort_keys=True),
        json.dumps([asdict(s) for s in specs]),
        code,
    )


def _plan(
    ws: Workspace,
    sections: tuple[dict, dict],
    specs: Sequence[ScoreKey],
    params: Sequence[Tensor],
    num_queries: int,
    num_train: int,
    folder: Path,
) -> tuple[list[QueryBlockTask], list[ScoreShardTask]]:
    """The query-block tasks and, for each block, its score-shard tasks."""
    per_query = query_bytes(specs, sum(p.numel() for p in params), len(params))
    budget = int(os.environ.get("DA_QUERY_BLOCK_BYTES", "0")) or QUERY_BLOCK_BYTES
    q_blocks = blocks(num_queries, max(1, budget // per_query))
    shards = training_shards(num_train)
    spec_dicts = tuple(asdict(s) for s in specs)
    root, threads = str(ws.root), ws.threads
    q_tasks = [
        QueryBlockTask(
            f"queries_{b.start:05d}_{b.stop:05d}",
            str(folder / f"queries_{b.start:05d}_{b.stop:05d}.pt"),
            root,
            *sections,
            spec_dicts,
            b.start,
            b.stop,
            threads,
        )  # fmt: skip
        for b in q_blocks
    ]
    s_tasks = [
        ScoreShardTask(
            f"scores_q{b.start:05d}_n{s.start:06d}_{s.stop:06d}",
            str(folder / f"scores_q{b.start:05d}_n{s.start:06d}_{s.stop:06d}.pt"),
            root,
            *sections,
            qt.output,
            b.start,
            s.start,
            s.stop,
            threads,
        )  # fmt: skip
        for qt, b in zip(q_tasks, q_blocks, strict=True)
        for s in shards
    ]
    return q_tasks, s_tasks


def gather(
    shard_files: Sequence[str | Path], num_queries: int, num_train: int
) -> tuple[ScoreSet, Timings]:
    """The (Q, N) matrices from score shards that tile queries x training set exactly (an
    error names what is missing or doubly covered), and the shards' summed timings."""
    out: dict[ScoreKey, Tensor] = {}
    covered = torch.zeros(num_queries, num_train, dtype=torch.int32)
    timings = Timings()
    for f in shard_files:
        scores, meta = _load_scores(Path(f))
        for key, s in scores.items():
            full = out.setdefault(key, torch.full((num_queries, num_train), float("nan")))
            rows = slice(meta["query_start"], meta["query_start"] + s.shape[0])
            full[rows, meta["start"] : meta["stop"]] = s
        first = next(iter(scores.values()))
        rows = slice(meta["query_start"], meta["query_start"] + first.shape[0])
        covered[rows, meta["start"] : meta["stop"]] += 1
        for k, v in meta["timings"].items():
            setattr(timings, k, getattr(timings, k) + v)
    if not bool((covered == 1).all()):
        bad = int((covered != 1).sum())
        raise ValueError(
            f"score shards cover {bad} of {covered.numel()} (query, example) pairs not exactly once"
        )
    return ScoreSet(out), timings


def sharded_attribute(
    ws: Workspace,
    specs: Sequence[ScoreKey],
    *,
    diffusion: DiffusionConfig,
    influence: InfluenceConfig,
    params: Sequence[Tensor],
    num_queries: int,
    num_train: int,
    progress: bool = True,
) -> tuple[ScoreSet, Timings]:
    """Every K-FAC score matrix of ``specs`` for the workspace's ``num_queries`` queries and
    ``num_train`` training examples (the ``diffusion`` and ``influence`` sections of the
    parameters; the curvatures are the workspace's; ``params`` the model's K-FAC parameters,
    which size the query blocks), computed as query-block and score-shard tasks (module
    docstring) through :func:`~diffusion_attribution.core.jobs.run_tasks`, resuming from
    finished task files; the query blocks' timings are added to the shards'. With one task
    per phase the tasks run in this process (no subprocess needed)."""
    folder = cache_folder(ws, "influence", cache_fingerprint(ws, diffusion, influence, specs))
    sections = (diffusion.model_dump(mode="json"), influence.model_dump(mode="json"))
    q_tasks, s_tasks = _plan(ws, sections, specs, params, num_queries, num_train, folder)
    n_shards = len(s_tasks) // len(q_tasks)
    done = sum(Path(t.output).exists() for t in (*q_tasks, *s_tasks))
    print(
        f"influence: {len(q_tasks)} query block(s) x {n_shards} training shard(s) "
        f"({done} of {len(q_tasks) + len(s_tasks)} task files exist) in {folder}",
        flush=True,
    )
    run_phase(ws, run_query_block, "influence-queries", q_tasks, progress)
    run_phase(ws, run_score_shard, "influence-scores", s_tasks, progress)
    scores, timings = gather([t.output for t in s_tasks], num_queries, num_train)
    for t in q_tasks:
        meta = json.loads(timings_path(t.output).read_text())
        timings.query_gradients += meta["query_gradients"]
        timings.precondition += meta["precondition"]
    return scores, timings
