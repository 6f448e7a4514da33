"""K-FAC influence split into jobs: blocks of queries x shards of the training set.

Score columns are independent given the preconditioned queries (eq. 6: score[q, j] is a dot
product of query q's preconditioned gradient with training example j's gradient), so the
influence stage (:mod:`diffusion_attribution.pipeline.stages.influence`) computes its score matrices in
two phases of independent tasks, each run through :func:`diffusion_attribution.core.jobs.run_tasks`
(inline, local subprocesses or a SLURM job array):

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
round-off of batching (a test checks it); shard sizes and executors are execution settings,
not parameters.

Resumption. Every task writes its file atomically and last; a task whose file exists is
never run again, so a killed stage resumes with the tasks that had not finished, and a killed
task is recomputed alone. The files live in ``.cache/influence/<fingerprint>/`` outside the
stage's DVC outputs (DVC deletes those before rerunning a stage), named by a fingerprint of
everything that determines them (:func:`cache_fingerprint`: the input files' bytes, the
parameters the stage reads, the score specs and the code); folders of other fingerprints are
moved aside into ``.cache/stale/influence/``, never deleted.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffusion_attribution.attribution.compression import Quantized
from diffusion_attribution.attribution.influence import Timings, precondition_queries, score_columns
from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet
from diffusion_attribution.core.io import atomic_save

__all__ = [
    "FeatureSettings",
    "FeatureShardTask",
    "QueryBlockTask",
    "ScoreShardTask",
    "blocks",
    "cache_fingerprint",
    "gather",
    "load_preconditioned",
    "query_bytes",
    "run_query_block",
    "run_score_shard",
    "save_preconditioned",
    "sharded_attribute",
    "sharded_train_features",
]

_FORMAT_QUERIES = "diffusion_attribution.pipeline.shards.queries/1"
_FORMAT_SCORES = "diffusion_attribution.pipeline.shards.scores/1"
#: Default bytes of stored preconditioned queries per block (all score matrices together).
QUERY_BLOCK_BYTES = 8 << 30


def blocks(n: int, size: int) -> list[range]:
    """``range(n)`` cut into consecutive blocks of ``size`` (the last may be shorter);
    ``size <= 0`` means one block."""
    if n < 1:
        raise ValueError(f"nothing to split: n = {n}")
    size = n if size <= 0 else int(size)
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


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
    from diffusion_attribution.core.config import DiffusionConfig, InfluenceConfig
    from diffusion_attribution.diffusion.unet import kfac_parameters
    from diffusion_attribution.pipeline.workspace import Workspace

    icfg = InfluenceConfig(**task.influence)
    ws = Workspace(task.root, threads=task.threads)
    ws.set_threads()
    net = ws.model
    measurements = ws.measurements(DiffusionConfig(**task.diffusion), icfg.timesteps)
    return icfg, ws, net, kfac_parameters(net), measurements


def run_query_block(task: QueryBlockTask) -> str:
    """Compute and save one query block (module docstring, phase 1); returns its path."""
    if Path(task.output).exists():
        return task.output
    start = time.perf_counter()
    icfg, ws, net, params, measurements = _context(task)
    specs = [ScoreKey(**d) for d in task.specs]
    curvatures = {v: ws.curvature(v) for v in dict.fromkeys(s.curvature for s in specs)}
    rows = slice(task.start, task.stop)
    timings = Timings()
    pre = precondition_queries(
        net,
        params,
        ws.samples["images"][rows],
        measurements,
        curvatures,
        specs,
        query_draws=icfg.query_draws,
        seed=icfg.seed,
        query_ids=torch.arange(task.start, task.stop),
        query_trajectories=ws.samples["trajectory"][:, rows],  # (T + 1, Q, C, H, W)
        batch_size=icfg.batch_size,
        timings=timings,
        progress=True,
    )
    # the timings beside the block (read without loading GBs of queries), then the block
    from diffusion_attribution.pipeline.workspace import write_json

    write_json(_timings_path(task.output), asdict(timings))
    save_preconditioned(
        pre, task.output, start=task.start, stop=task.stop, seconds=time.perf_counter() - start
    )
    return task.output


def _timings_path(output: str | Path) -> Path:
    return Path(f"{output}.timings.json")


def run_score_shard(task: ScoreShardTask) -> str:
    """Compute and save the score columns of one (query block, training shard) pair (module
    docstring, phase 2); returns its path."""
    if Path(task.output).exists():
        return task.output
    start = time.perf_counter()
    icfg, ws, net, params, measurements = _context(task)
    pre = load_preconditioned(task.block, device=next(net.parameters()).device)
    timings = Timings()
    scores = score_columns(
        net,
        params,
        ws.dataset.images,
        pre,
        train_measurement=measurements["loss"],
        train_draws=icfg.train_draws,
        seed=icfg.seed,
        columns=range(task.start, task.stop),
        batch_size=icfg.batch_size,
        timings=timings,
        progress=True,
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


def cache_fingerprint(ws, diffusion, influence, specs: Sequence[ScoreKey]) -> str:
    """What determines the shard files (module docstring): the bytes of the training set,
    the model, the samples and every curvature file used (which stand for the ``curvature``
    parameters), the ``diffusion`` and ``influence`` parameters, the specs and the code that
    computes them."""
    from diffusion_attribution.attribution import compression
    from diffusion_attribution.attribution import influence as influence_module
    from diffusion_attribution.core.identity import code_digest, file_digest, fingerprint
    from diffusion_attribution.curvature import kfac as curvature
    from diffusion_attribution.curvature import kronecker
    from diffusion_attribution.diffusion import ddpm, gradients, measurements, unet

    files = [ws.path(ws.TRAIN_SET), ws.path(ws.MODEL), ws.path(ws.SAMPLES)]
    files += [ws.path(ws.CURVATURE.format(variant=v)) for v in sorted({s.curvature for s in specs})]
    sections = {
        "diffusion": diffusion.model_dump(mode="json"),
        "influence": influence.model_dump(mode="json"),
    }
    code = code_digest(
        compression, curvature, ddpm, gradients, influence_module, kronecker, measurements, unet,
        run_query_block, run_score_shard, save_preconditioned, load_preconditioned,
    )  # fmt: skip
    return fingerprint(
        *(file_digest(f) for f in files),
        json.dumps(sections, sort_keys=True),
        json.dumps([asdict(s) for s in specs]),
        code,
    )


def _plan(ws, diffusion, influence, specs: Sequence[ScoreKey], folder: Path, threads: int):
    from diffusion_attribution.diffusion.unet import kfac_parameters

    sections = (diffusion.model_dump(mode="json"), influence.model_dump(mode="json"))
    net_params = kfac_parameters(ws.model)
    per_query = query_bytes(specs, sum(p.numel() for p in net_params), len(net_params))
    budget = int(os.environ.get("DA_QUERY_BLOCK_BYTES", "0")) or QUERY_BLOCK_BYTES
    q_blocks = blocks(len(ws.samples["images"]), max(1, budget // per_query))
    shards = blocks(len(ws.dataset), int(os.environ.get("DA_SHARD_EXAMPLES", "0")))
    spec_dicts = tuple(asdict(s) for s in specs)
    root = str(ws.root)
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
    ws, specs: Sequence[ScoreKey], *, diffusion, influence, progress: bool = True
) -> tuple[ScoreSet, Timings]:
    """Every K-FAC score matrix of ``specs`` for the workspace's queries and training set
    (the ``diffusion`` and ``influence`` sections of the parameters; the curvatures are the
    workspace's),
    computed as query-block and score-shard tasks (module docstring) through
    :func:`~diffusion_attribution.core.jobs.run_tasks`, resuming from finished task files; the
    query blocks' timings are added to the shards'. With one task per phase the tasks run in
    this process (no subprocess needed)."""
    folder = _cache_folder(ws, "influence", cache_fingerprint(ws, diffusion, influence, specs))
    q_tasks, s_tasks = _plan(ws, diffusion, influence, specs, folder, ws.threads)
    n_shards = len(s_tasks) // len(q_tasks)
    done = sum(Path(t.output).exists() for t in (*q_tasks, *s_tasks))
    print(
        f"influence: {len(q_tasks)} query block(s) x {n_shards} training shard(s) "
        f"({done} of {len(q_tasks) + len(s_tasks)} task files exist) in {folder}",
        flush=True,
    )
    _run_phase(ws, run_query_block, "influence-queries", q_tasks, progress)
    _run_phase(ws, run_score_shard, "influence-scores", s_tasks, progress)
    scores, timings = gather(
        [t.output for t in s_tasks], len(ws.samples["images"]), len(ws.dataset)
    )
    for t in q_tasks:
        meta = json.loads(_timings_path(t.output).read_text())
        timings.query_gradients += meta["query_gradients"]
        timings.precondition += meta["precondition"]
    return scores, timings


# ---- curvature factors in shards ------------------------------------------------------------
#
# K-FAC factors are sums over rows (:mod:`diffusion_attribution.curvature.factors`): the curvature
# stage fits each (Fisher, expand / reduce) pair as factor sums over shards of the training
# set, adds them and eigendecomposes once; an EK-FAC variant adds a second pass of
# correction sums over the same shards in the combined eigenbases.


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
    from diffusion_attribution.core.config import CurvatureConfig, DiffusionConfig
    from diffusion_attribution.curvature import factors
    from diffusion_attribution.diffusion.measurements import DiffusionLoss
    from diffusion_attribution.diffusion.unet import kfac_parameters
    from diffusion_attribution.pipeline.workspace import Workspace, schedule_of

    if Path(task.output).exists():
        return task.output
    start = time.perf_counter()
    ccfg = CurvatureConfig(**task.curvature)
    schedule = schedule_of(DiffusionConfig(**task.diffusion))
    ws = Workspace(task.root, threads=task.threads)
    ws.set_threads()
    net = ws.model
    params = kfac_parameters(net)
    ids = torch.arange(task.start, task.stop)
    x0 = ws.dataset.images[ids]
    # (t, eps) depend only on (seed, example id): a shard draws its own examples' draws
    draws = DiffusionLoss(schedule).draw(x0, ids, ccfg.num_draws, ccfg.seed)
    device = ws.device
    args = (net, params, schedule, x0.to(device), draws["t"].to(device), draws["eps"].to(device))
    kw = dict(example_offset=task.start, batch_size=ccfg.batch_size, mc_seed=ccfg.seed)
    if task.kind == "factors":
        sums = factors.factor_sums(*args, fisher=task.fisher, kfac=task.kfac, **kw)
    elif task.kind == "corrections":
        from diffusion_attribution.curvature.kfac import KFAC

        basis = KFAC.load(task.basis).to(device)
        sums = factors.correction_sums(*args, basis, fisher=task.fisher, **kw)
    else:
        raise ValueError(f"unknown factor task kind {task.kind!r}")
    from diffusion_attribution.pipeline.workspace import write_json

    write_json(_timings_path(task.output), {"seconds": time.perf_counter() - start})
    sums.save(task.output)
    return task.output


def curvature_fingerprint(ws, diffusion, curvature) -> str:
    """What determines the factor shards: the bytes of the training set and the model, the
    ``diffusion`` and ``curvature`` parameters and the code that computes them."""
    from diffusion_attribution.core.identity import code_digest, file_digest, fingerprint
    from diffusion_attribution.curvature import factors, kronecker
    from diffusion_attribution.curvature import kfac as curvature_module
    from diffusion_attribution.diffusion import ddpm, measurements, unet

    sections = {
        "diffusion": diffusion.model_dump(mode="json"),
        "curvature": curvature.model_dump(mode="json"),
    }
    code = code_digest(
        factors, kronecker, curvature_module, ddpm, measurements, unet, run_factor_shard
    )
    return fingerprint(
        file_digest(ws.path(ws.TRAIN_SET)),
        file_digest(ws.path(ws.MODEL)),
        json.dumps(sections, sort_keys=True),
        code,
    )


def sharded_curvatures(
    ws, variants: Sequence[str], *, diffusion, curvature, progress: bool = True
) -> Iterator[tuple[str, object]]:
    """Yield ``(variant, K-FAC or EK-FAC)`` for every variant (``"<fisher>_<kfac>"``,
    ``"ekfac_..."``) in order, fitted as factor-sum shards of ``DA_SHARD_EXAMPLES`` training
    examples (default: one shard) through :func:`~diffusion_attribution.core.jobs.run_tasks`,
    resumable per shard in ``.cache/curvature/<fingerprint>/``. Variants sharing (Fisher,
    expand / reduce) share their factor sums. The sums are combined and eigendecomposed on
    the workspace's device, one variant at a time (at paper scale one K-FAC of the Ho U-Net
    holds GBs): save each before asking for the next. ``meta["fit_seconds"]`` is the
    variant's tasks' summed time."""
    from diffusion_attribution.core.config import parse_variant
    from diffusion_attribution.curvature import factors
    from diffusion_attribution.curvature.kfac import KFAC

    folder = _cache_folder(ws, "curvature", curvature_fingerprint(ws, diffusion, curvature))
    shards = blocks(len(ws.dataset), int(os.environ.get("DA_SHARD_EXAMPLES", "0")))
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

    def seconds(tasks) -> float:
        return sum(json.loads(_timings_path(t.output).read_text())["seconds"] for t in tasks)

    def fitted(pair) -> KFAC:
        mine = [t for t in fit_tasks if (t.fisher, t.kfac) == pair]
        sums = factors.combine(factors.FactorSums.load(t.output, device=device) for t in mine)
        K = factors.to_kfac(sums, meta={"batch_size": curvature.batch_size})
        K.meta["fit_seconds"] = seconds(mine)
        return K

    print(
        f"curvature: {len(pairs)} factor fit(s) x {len(shards)} training shard(s) in {folder}",
        flush=True,
    )
    fit_tasks = tasks_for("factors", pairs)
    _run_phase(ws, run_factor_shard, "curvature-factors", fit_tasks, progress)
    # EK-FAC's second pass works in the combined eigenbases, saved for its tasks to read
    for pair in ek_pairs:
        if not basis_file(*pair).exists():
            fitted(pair).save(basis_file(*pair))
    corr_tasks = tasks_for("corrections", ek_pairs)
    _run_phase(ws, run_factor_shard, "curvature-corrections", corr_tasks, progress)
    for v, (f, k, ekfac) in parsed.items():
        if not ekfac:
            yield v, fitted((f, k))
            continue
        mine = [t for t in corr_tasks if (t.fisher, t.kfac) == (f, k)]
        basis = KFAC.load(basis_file(f, k)).to(device)
        corr = factors.combine(factors.CorrectionSums.load(t.output, device=device) for t in mine)
        K = factors.apply_corrections(basis, corr)
        fit = [t for t in fit_tasks if (t.fisher, t.kfac) == (f, k)]
        K.meta["fit_seconds"] = seconds(fit) + seconds(mine)
        yield v, K


# ---- TRAK / D-TRAK training features in shards --------------------------------------------
#
# The baselines stage's long part is the projected training gradients, one row per example
# (:func:`~diffusion_attribution.attribution.trak.train_features`); the kernels and scores after them take
# seconds. The rows are computed as shards of the training set, resumable per shard in
# ``.cache/baselines/<fingerprint>/``, and concatenated.


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
    """Projected training gradients of examples ``start:stop`` for TRAK or D-TRAK
    (``method``, :data:`~diffusion_attribution.attribution.trak.TRAIN_MEASUREMENTS`), written to
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
    from diffusion_attribution.attribution.projection import Projector
    from diffusion_attribution.attribution.trak import TRAIN_MEASUREMENTS, train_features
    from diffusion_attribution.core.config import DiffusionConfig
    from diffusion_attribution.diffusion.unet import kfac_parameters
    from diffusion_attribution.pipeline.workspace import Workspace, write_json

    if Path(task.output).exists():
        return task.output
    start = time.perf_counter()
    fs = FeatureSettings(**task.settings)
    ws = Workspace(task.root, threads=task.threads)
    ws.set_threads()
    net = ws.model
    params = kfac_parameters(net)
    measurements = ws.measurements(DiffusionConfig(**task.diffusion), timesteps=())
    measurement = measurements[TRAIN_MEASUREMENTS[task.method]]
    projector = Projector(
        sum(p.numel() for p in params), fs.projection_dim, seed=fs.projection_seed,
        kind=fs.projection,
    )  # fmt: skip
    features = train_features(
        net,
        params,
        measurement,
        ws.dataset.images[task.start : task.stop],
        projector,
        train_draws=fs.train_draws,
        seed=fs.seed,
        batch_size=fs.batch_size,
        first_id=task.start,
        progress=True,
    )
    write_json(_timings_path(task.output), {"seconds": time.perf_counter() - start})
    atomic_save({"features": features.cpu(), "start": task.start, "stop": task.stop}, task.output)
    return task.output


def baselines_fingerprint(ws, diffusion, settings: FeatureSettings) -> str:
    """What determines the feature shards: the bytes of the training set and the model, the
    ``diffusion`` section, the :class:`FeatureSettings` and the code that computes them."""
    from diffusion_attribution.attribution import projection
    from diffusion_attribution.attribution import trak as trak_module
    from diffusion_attribution.core.identity import code_digest, file_digest, fingerprint
    from diffusion_attribution.diffusion import ddpm, gradients, measurements, unet

    values = {"diffusion": diffusion.model_dump(mode="json"), "features": asdict(settings)}
    code = code_digest(
        trak_module, projection, gradients, measurements, ddpm, unet, run_feature_shard
    )
    return fingerprint(
        file_digest(ws.path(ws.TRAIN_SET)),
        file_digest(ws.path(ws.MODEL)),
        json.dumps(values, sort_keys=True),
        code,
    )


def sharded_train_features(
    ws, *, diffusion, settings: FeatureSettings, progress: bool = True
) -> dict[str, Tensor]:
    """TRAK's and D-TRAK's (N, k) training features (method -> tensor, on the workspace's
    device), computed as shards of ``DA_SHARD_EXAMPLES`` examples (default: one shard)
    through :func:`~diffusion_attribution.core.jobs.run_tasks`, resuming from finished shard
    files. Equal to :func:`~diffusion_attribution.attribution.trak.train_features` on the whole set up to
    float round-off of batching (draws depend only on (seed, example id))."""
    from diffusion_attribution.attribution.trak import TRAIN_MEASUREMENTS
    from diffusion_attribution.core.io import load

    folder = _cache_folder(ws, "baselines", baselines_fingerprint(ws, diffusion, settings))
    shards = blocks(len(ws.dataset), int(os.environ.get("DA_SHARD_EXAMPLES", "0")))
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
        for m in TRAIN_MEASUREMENTS
        for s in shards
    ]
    done = sum(Path(t.output).exists() for t in tasks)
    print(
        f"baselines: {len(TRAIN_MEASUREMENTS)} methods x {len(shards)} training shard(s) "
        f"({done} of {len(tasks)} feature files exist) in {folder}",
        flush=True,
    )
    _run_phase(ws, run_feature_shard, "baselines-features", tasks, progress)
    out = {}
    for m in TRAIN_MEASUREMENTS:
        mine = [load(t.output, "feature shard") for t in tasks if t.method == m]
        if [(d["start"], d["stop"]) for d in mine] != [(s.start, s.stop) for s in shards]:
            raise ValueError(f"feature shards of {m} in {folder} do not tile the training set")
        out[m] = torch.cat([d["features"] for d in mine]).to(ws.device)
    return out


# ---- what both stages' fan-outs share -------------------------------------------------------


def _cache_folder(ws, stage: str, fp: str) -> Path:
    """``.cache/<stage>/<fp>/``, created; folders of other fingerprints (other inputs or
    code) are moved aside into ``.cache/stale/<stage>/``, never deleted."""
    from diffusion_attribution.core.identity import move_aside

    root = ws.path(f".cache/{stage}")
    stale = [p for p in root.glob("*") if p.is_dir() and p.name != fp] if root.exists() else []
    moved = move_aside(stale, ws.stale_dir(stage))
    if moved:
        print(f"{stage}: moved {len(moved)} shard folders of other inputs to {moved[0][1].parent}")
    folder = root / fp
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _run_phase(ws, fn, phase: str, tasks: Sequence, progress: bool) -> None:
    """``tasks`` through :func:`~diffusion_attribution.core.jobs.run_tasks` on ``DA_EXECUTOR``: in
    this process when it is ``inline`` or a local run has at most one task left, else local
    subprocesses sharing the workspace's threads, or SLURM."""
    from diffusion_attribution.core.jobs import run_tasks

    todo = [t for t in tasks if not Path(t.output).exists()]
    if not todo:
        return
    executor = os.environ.get("DA_EXECUTOR", "local")
    inline = executor == "inline" or (executor == "local" and len(todo) <= 1)
    if not inline and executor == "local":
        # several local subprocesses share the cores
        parallel = int(os.environ.get("DA_MAX_PARALLEL", "0")) or os.cpu_count() or 1
        per = max(1, ws.threads // min(parallel, len(todo)))
        tasks = [type(t)(**{**asdict(t), "threads": per}) for t in tasks]
    run_tasks(
        fn,
        tasks,
        name=phase,
        executor="inline" if inline else executor,
        folder=str(ws.folder(f".cache/submitit/{phase}")),
        progress=progress,
    )
