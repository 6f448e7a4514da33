"""TRAK projection: our seeded chunked projector against traker 0.3.2's CPU projector.

On the same per-example gradients (TRAK: diffusion loss, training rows scaled to lbar = l / D)
of the digits-2 training set (sklearn digits 3 and 8, N = 357) and Q generated queries, for
each projection dimension k this runs, each in its own process (so each peak RSS is that
path's own, model and imports included):

* ours: :func:`diffusion_attribution.attribution.projection.featurize` with
  :class:`~diffusion_attribution.attribution.projection.Projector` (Rademacher, regenerated chunk by chunk,
  gradients buffered per call);
* traker: :class:`trak.projectors.BasicProjector` (``proj_type`` normal -- what ``TRAKer``
  picks on CPU -- float32), called per batch of 32 gradients as ``TRAKer.featurize`` does with
  its default ``proj_max_batch_size``; its output is divided by sqrt(k) to match our scaling.

and prints the wall time of the gradient and projection parts, the projection speed-up, the
peak RSS, and the agreement (mean over queries of the Spearman correlation across training
examples) of the TRAK scores from the two sketches at the same normalised damping (scores for
both from :func:`~diffusion_attribution.attribution.trak.trak_scores`; traker's own score computer is run
too and compared on the same features, which checks :func:`~diffusion_attribution.attribution.trak.
trak_lambda`). Two sketches are independent random draws, so agreement is ~0.7-0.85, not 1.

traker pitfalls guarded (FACTS.md): one projector instance with a fixed ``model_id`` for
training and query gradients (its sketch is regenerated from stored generator states on every
call; a training row is projected again with the queries and must come out bit-identical);
``lambda_reg`` is set to N * damping > 0 (its default 0 inverts a singular X^T X when N < k);
``free_memory()`` (which deletes ``proj_matrix``) is never called.

Then, in this process and side by side (``--generators``, on by default; ``--only-generators``
alone, ~3-5 min), the projection time per batch of the same training gradients at k = 8192
(``--generator-dim``) through three sketches, interleaved over ``--repeats`` rounds (best
round reported), and each one's generation rate (entries of R per second, one full pass):

* new: :class:`~diffusion_attribution.attribution.projection.Projector`, R hashed on the gradients'
  device with torch integer ops (the library's projector);
* previous: :class:`PreviousPhiloxProjector` below, a copy of the projector's *previous*
  generation (numpy Philox-4x64 bits unpacked on the CPU), kept here only for this comparison;
* traker 0.3.2's ``BasicProjector`` (normal entries, as ``TRAKer`` picks on CPU), per batch
  of 32 as ``TRAKer.featurize`` calls it.

Timing does not depend on the weights: ``outputs/train/model.pt`` is used if it exists, else a
randomly initialised TINY_DIGITS U-Net.

    python benchmarks/bench_trak.py                         # k = 8192 and 2048, generators
    python benchmarks/bench_trak.py --dims 2048 --draws 8   # quicker
    python benchmarks/bench_trak.py --only-generators       # the generator comparison alone
    python benchmarks/bench_trak.py --options               # also: projector design options
    python benchmarks/bench_trak.py --only-generators --options  # both, without featurize
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = Path("outputs/train/model.pt")


def load_setup(args: argparse.Namespace):
    from diffusion_attribution.diffusion.datasets import load_digits
    from diffusion_attribution.diffusion.ddpm import NoiseSchedule
    from diffusion_attribution.diffusion.measurements import DiffusionLoss
    from diffusion_attribution.diffusion.training import load_model
    from diffusion_attribution.diffusion.unet import UNet, kfac_parameters
    from diffusion_attribution.testing import TINY_DIGITS

    if MODEL.exists() and not args.random_init:
        model, source = load_model(MODEL), str(MODEL)
    else:
        torch.manual_seed(0)
        model, source = UNet(TINY_DIGITS).eval(), "random init TINY_DIGITS"
    train = load_digits((3, 8)).images
    loss = DiffusionLoss(NoiseSchedule.linear())
    return model, kfac_parameters(model), train, loss, source


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(args: argparse.Namespace) -> dict:
    from diffusion_attribution.attribution.influence import train_gradient_scale

    torch.set_num_threads(args.threads)
    model, params, train, loss, source = load_setup(args)
    queries = torch.load(args.queries_file, weights_only=True)
    n, num_params = len(train), sum(p.numel() for p in params)
    t_draws = loss.draw(train, torch.arange(n), args.draws, seed=0)
    q_draws = loss.draw(queries, torch.arange(len(queries)), args.draws, seed=1)
    scale = train_gradient_scale(train[0].numel())
    rss_setup = peak_rss_gib()
    result = {"role": args.role, "k": args.dim, "P": num_params, "model": source}

    if args.role == "ours":
        from diffusion_attribution.attribution.projection import Projector, featurize

        proj = Projector(num_params, args.dim, seed=0, kind=args.our_kind)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        tf = featurize(
            model,
            params,
            loss,
            train,
            t_draws,
            proj,
            batch_size=args.batch_size,
            scale=scale,
            timings=timings,
        )
        qf = featurize(
            model,
            params,
            loss,
            queries,
            q_draws,
            proj,
            batch_size=args.batch_size,
            timings=timings,
        )
        total = time.perf_counter() - start
        result.update(
            kind=args.our_kind,
            grad_s=timings["gradients"],
            proj_s=timings["projection"],
            total_s=total,
            cached=proj.caches,
        )
    else:
        from trak.projectors import BasicProjector, ProjectionType

        from diffusion_attribution.diffusion.gradients import per_example_gradients

        proj = BasicProjector(
            grad_dim=num_params,
            proj_dim=args.dim,
            seed=0,
            proj_type=ProjectionType(args.traker_kind),
            device="cpu",
            dtype=torch.float32,
        )
        grad_s = proj_s = 0.0
        model_id = 0  # fixed: a new model_id would re-seed and give a different sketch
        start = time.perf_counter()

        def run(x, draws, s, extra):
            """Projected rows of x, and of ``extra`` (appended to the first call)."""
            nonlocal grad_s, proj_s
            out, extra_out = [], None
            it = iter(per_example_gradients(model, params, loss, x, draws, batch_size=32, scale=s))
            while True:
                t0 = time.perf_counter()
                try:
                    _, g = next(it)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                b = g.shape[0]
                if extra_out is None:
                    g = torch.cat([g, extra])
                phi = proj.project(g, model_id=model_id)
                if extra_out is None:
                    phi, extra_out = phi[:b], phi[b:]
                out.append(phi)
                grad_s += t1 - t0
                proj_s += time.perf_counter() - t1
            return torch.cat(out), extra_out

        first_row = next(
            iter(
                per_example_gradients(
                    model,
                    params,
                    loss,
                    train[:1],
                    {k: v[:1] for k, v in t_draws.items()},
                    scale=scale,
                )
            )
        )[1]
        tf, check_a = run(train, t_draws, scale, first_row)
        qf, check_b = run(queries, q_draws, 1.0, first_row)
        total = time.perf_counter() - start
        # guard 1: the sketch is the same in every call (one gradient projected in both runs)
        same = torch.allclose(check_a, check_b, rtol=1e-5, atol=1e-6 * float(check_a.abs().max()))
        assert proj.proj_matrix_available  # guard 3: never freed
        if not same:
            raise RuntimeError("traker's projector gave a different sketch in a later call")
        tf, qf = tf / math.sqrt(args.dim), qf / math.sqrt(args.dim)
        result.update(
            kind=args.traker_kind, grad_s=grad_s, proj_s=proj_s, total_s=total, same_sketch=same
        )
        if args.traker_scorer:  # its score computer, lambda_reg = N * damping (guard 2)
            from trak.score_computers import BasicScoreComputer

            from diffusion_attribution.attribution.trak import mean_eigenvalue, trak_lambda

            damping = args.rel_damping * mean_eigenvalue(tf)
            lam = trak_lambda(damping, n)
            assert lam > 0
            sc = BasicScoreComputer(dtype=torch.float32, device="cpu", lambda_reg=lam)
            t0 = time.perf_counter()
            xtx = sc.get_xtx(tf)
            feats = sc.get_x_xtx_inv(tf, xtx)
            acc = torch.zeros(n, len(queries))
            sc.get_scores(feats, qf, accumulator=acc)
            result["traker_score_s"] = time.perf_counter() - t0
            torch.save(acc.T.contiguous(), Path(args.out) / f"traker_scorer_{args.dim}.pt")

    result["rss_setup_gib"] = rss_setup
    result["peak_rss_gib"] = peak_rss_gib()
    torch.save({"train": tf, "query": qf}, Path(args.out) / f"{args.role}_{args.dim}.pt")
    return result


# --------------------------------------------------------------------------------------
# The generator comparison (in this process)
# --------------------------------------------------------------------------------------


class PreviousPhiloxProjector:
    """THE PREVIOUS IMPLEMENTATION, kept only for comparison: the library's +-1 sketch before
    it moved to the device (numpy Philox-4x64 keyed by SeedSequence([seed, 0x7241]), block b of
    64 rows from counter (0, b, 0, 0), bits by ``np.unpackbits``, generated on the CPU chunk by
    chunk (4 MiB) and multiplied into the result). Not used by the library."""

    def __init__(self, num_params: int, dim: int, seed: int = 0):
        import numpy as np

        self.np, self.num_params, self.dim = np, num_params, dim
        self.chunk = -(-max(1, (4 << 20) // (4 * dim)) // 64) * 64
        self.key = np.random.SeedSequence([seed, 0x7241]).generate_state(2, dtype=np.uint64)

    def sketch_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        np = self.np
        for r in range(start, stop, 64):
            rows = min(64, stop - r)
            counter = np.array([0, r // 64, 0, 0], dtype=np.uint64)
            bits = np.random.Philox(key=self.key, counter=counter).random_raw(
                -(-64 * self.dim // 64)
            )
            u = np.unpackbits(bits.view(np.uint8), count=rows * self.dim)
            block = out[r - start : r - start + rows]
            block.copy_(torch.from_numpy(u).view(rows, self.dim))
            block.mul_(2.0).sub_(1.0)
        return out[: stop - start]

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(grads.shape[0], self.dim)
        buf = torch.empty(self.chunk, self.dim)
        for start in range(0, self.num_params, self.chunk):
            stop = min(start + self.chunk, self.num_params)
            out.addmm_(grads[:, start:stop], self.sketch_rows(start, stop, buf))
        return out.mul_(1.0 / math.sqrt(self.dim))


def generators(args: argparse.Namespace) -> None:
    """Projection time per batch and generation rate: new, previous and traker's sketches."""
    from trak.projectors import BasicProjector, ProjectionType

    from diffusion_attribution.attribution.influence import train_gradient_scale
    from diffusion_attribution.attribution.projection import BLOCK_ROWS, PROJECT_BYTES, Projector
    from diffusion_attribution.diffusion.gradients import gradient_matrix

    torch.set_num_threads(args.threads)
    model, params, train, loss, source = load_setup(args)
    n, num_params, dim = len(train), sum(p.numel() for p in params), args.generator_dim
    draws = loss.draw(train, torch.arange(n), args.draws, seed=0)
    scale = train_gradient_scale(train[0].numel())
    grads = gradient_matrix(model, params, loss, train, draws, batch_size=32, scale=scale)
    new = Projector(num_params, dim, seed=0, cache_bytes=0)
    old = PreviousPhiloxProjector(num_params, dim, seed=0)
    traker = BasicProjector(
        grad_dim=num_params,
        proj_dim=dim,
        seed=0,
        proj_type=ProjectionType.normal,
        device="cpu",
        dtype=torch.float32,
    )
    featurize_rows = max(32, PROJECT_BYTES // (4 * num_params))  # featurize's default
    cpu = torch.device("cpu")

    def new_pass() -> None:
        hasher = new._hasher(cpu, new.chunk // BLOCK_ROWS)  # the loop project() runs
        buf = torch.empty(new.chunk, dim)
        for i in range(0, num_params, new.chunk):
            new._rows(hasher, i, min(i + new.chunk, num_params), buf, buf)

    def old_pass() -> None:
        buf = torch.empty(old.chunk, dim)
        for i in range(0, num_params, old.chunk):
            old.sketch_rows(i, min(i + old.chunk, num_params), buf)

    def traker_pass() -> None:
        for state in traker.generator_states:
            traker.generate_sketch_matrix(state)

    def clock(f) -> tuple[float, float]:
        """(wall, CPU) seconds of f(): CPU time (this process; one torch thread) is what
        survives a machine shared with other jobs best."""
        w0, c0 = time.perf_counter(), time.process_time()
        f()
        return time.perf_counter() - w0, time.process_time() - c0

    def batches(project, rows: int, limit: int) -> tuple[float, float]:
        """(wall, CPU) seconds per batch of ``rows`` gradients, over the first ``limit``
        batches of the N training gradients."""
        starts = list(range(0, n, rows))[:limit]
        wall, cpu_s = clock(lambda: [project(grads[i : i + rows]) for i in starts])
        return wall / len(starts), cpu_s / len(starts)

    limit = args.batches
    jobs = {
        ("new", 32): lambda: batches(new.project, 32, limit),
        ("previous", 32): lambda: batches(old.project, 32, limit),
        ("traker", 32): lambda: batches(lambda g: traker.project(g, model_id=0), 32, 1),
        ("new", featurize_rows): lambda: batches(new.project, featurize_rows, limit),
        ("previous", featurize_rows): lambda: batches(old.project, featurize_rows, limit),
    }
    passes = {"new": new_pass, "previous": old_pass, "traker": traker_pass}
    best: dict = {}
    print(
        f"\ngenerators: k = {dim}, P = {num_params} ({source}), TRAK training gradients "
        f"({args.draws} draws), {args.threads} torch thread(s), best of {args.repeats} "
        f"interleaved rounds; batches of 32 and of {featurize_rows} (featurize's default), "
        f"the first {limit} of each (traker: 1); 1-min load {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    def keep(key, times) -> None:
        old_best = best.get(key, (math.inf, math.inf))
        best[key] = (min(old_best[0], times[0]), min(old_best[1], times[1]))

    for _ in range(args.repeats):
        for key, job in jobs.items():
            keep(key, job())
        for name, run_pass in passes.items():
            keep(name, clock(run_pass))
    labels = {
        "new": "new: torch hash on the device",
        "previous": "previous: numpy Philox (copy)",
        "traker": "traker 0.3.2 BasicProjector",
    }
    head = (
        f"{'sketch':31} {'rows':>4} {'s/batch wall':>12} {'CPU':>6} {'CPU vs new':>10} "
        f"{'one pass wall':>13} {'CPU':>6} {'G entries/s (CPU)':>17}"
    )
    print(head)
    print("-" * len(head))
    for name, rows in jobs:
        wall, cpu_s = best[name, rows]
        ratio = cpu_s / best["new", rows][1]
        gen_wall, gen_cpu = best[name]
        print(
            f"{labels[name]:31} {rows:4d} {wall:12.3f} {cpu_s:6.3f} {ratio:9.2f}x "
            f"{gen_wall:13.3f} {gen_cpu:6.3f} {num_params * dim / gen_cpu / 1e9:17.2f}"
        )
    print(
        "(s/batch: projection of one batch, generation + GEMM; traker regenerates its whole "
        "sketch each call. One pass: generating all of R once, no GEMM.)"
    )


def mean_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return sum(spearmanr(x, y)[0] for x, y in zip(a.numpy(), b.numpy(), strict=True)) / len(a)


def options(args: argparse.Namespace) -> None:
    """Projector design options on random gradients of the model's size (this process)."""
    from diffusion_attribution.attribution.projection import BLOCK_ROWS, Projector

    torch.set_num_threads(args.threads)
    _, params, train, _, _ = load_setup(args)
    num_params, n = sum(p.numel() for p in params), len(train)
    g = torch.randn(n, num_params)
    print(f"\nprojector options (P = {num_params}, random gradients, {args.threads} thread(s))")
    print(f"{'option':46} {'k':>5} {'rows/call':>9} {'s per 357 rows':>15}")
    for dim in args.dims:
        variants = [
            (f"regenerate, chunk {c} rows", dict(chunk=c, cache_bytes=0)) for c in (64, 512)
        ]
        variants.append(("regenerate, default chunk (4 MiB)", dict(cache_bytes=0)))
        variants.append(("gaussian, regenerate", dict(kind="gaussian", cache_bytes=0)))
        if num_params * dim * 4 <= 2 << 30:
            variants.append(("cached sketch (after first call)", dict(cache_bytes=2 << 30)))
        for name, kw in variants:
            for rows in (32, n):
                pr = Projector(num_params, dim, seed=0, **kw)
                if pr.caches:
                    pr.project(g[:1])
                start = time.perf_counter()
                for i in range(0, n, rows):
                    pr.project(g[i : i + rows])
                el = time.perf_counter() - start
                print(f"{name:46} {dim:5d} {rows:9d} {el:15.2f}", flush=True)
        pr = Projector(num_params, dim, seed=0, cache_bytes=0)
        start = time.perf_counter()
        hasher = pr._hasher(torch.device("cpu"), pr.chunk // BLOCK_ROWS)  # as project() does
        buf = torch.empty(pr.chunk, dim)
        for i in range(0, num_params, pr.chunk):
            pr._rows(hasher, i, min(i + pr.chunk, num_params), buf, buf)
        print(
            f"{'generate the +-1 sketch alone (one pass)':46} {dim:5d} {'':9} "
            f"{time.perf_counter() - start:15.2f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dims", type=int, nargs="+", default=[8192, 2048])
    p.add_argument("--draws", type=int, default=16, help="(t, eps) draws per gradient")
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="0: 1 if the machine is busy, else 2")
    p.add_argument("--our-kind", default="rademacher", choices=["rademacher", "gaussian"])
    p.add_argument("--traker-kind", default="normal", choices=["normal", "rademacher"])
    p.add_argument("--rel-damping", type=float, default=1e-2, help="damping / (trace(F) / k)")
    p.add_argument("--no-traker-scorer", dest="traker_scorer", action="store_false")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--options", action="store_true", help="also time projector variants")
    p.add_argument("--no-generators", dest="generators", action="store_false")
    p.add_argument("--only-generators", action="store_true", help="the generator table alone")
    p.add_argument("--generator-dim", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3, help="rounds of the generator comparison")
    p.add_argument("--batches", type=int, default=4, help="batches timed per round and size")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--queries-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        print(json.dumps(child(args)))
        return

    from diffusion_attribution.attribution.trak import mean_eigenvalue, trak_scores
    from diffusion_attribution.diffusion.ddpm import sample

    load1 = os.getloadavg()[0]
    note = ""
    if args.threads == 0:
        args.threads = 1 if load1 > 0.5 else 2
        if args.threads == 1:
            note = f"machine busy (1-min load {load1:.1f} before start): 1 torch thread"
    torch.set_num_threads(args.threads)
    if args.only_generators:  # no featurize comparison: the generators (and --options)
        print(f"threads = {args.threads}" + (f" ({note})" if note else ""))
        generators(args)
        if args.options:
            options(args)
        return
    model, params, train, loss, source = load_setup(args)
    out = tempfile.mkdtemp(prefix="bench_trak_")
    queries = sample(model, loss.schedule, args.queries, tuple(train.shape[1:]), seed=0).x0
    queries_file = str(Path(out) / "queries.pt")
    torch.save(queries, queries_file)
    print(
        f"model: {source}; P = {sum(p.numel() for p in params)}; N = {len(train)}, "
        f"Q = {args.queries}, draws = {args.draws}; threads = {args.threads}"
        + (f" ({note})" if note else ""),
        flush=True,
    )

    forwarded = ["--draws", "--batch-size", "--threads", "--our-kind", "--traker-kind"]
    forwarded += ["--rel-damping"]
    base = [sys.executable, __file__, "--out", out, "--queries-file", queries_file]
    for flag in forwarded:
        base += [flag, str(getattr(args, flag[2:].replace("-", "_")))]
    if not args.traker_scorer:
        base.append("--no-traker-scorer")
    if args.random_init:
        base.append("--random-init")
    res: dict[tuple[str, int], dict] = {}
    for dim in args.dims:
        for role in ("ours", "traker"):
            cmd = base + ["--role", role, "--dim", str(dim)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{role} k={dim} failed:\n{proc.stderr[-3000:]}")
            res[role, dim] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = res[role, dim]
            print(f"  done: {role:6} k={dim:5d} projection {r['proj_s']:.1f} s", flush=True)

    feats = {key: torch.load(Path(out) / f"{key[0]}_{key[1]}.pt") for key in res}
    scores = {}
    for key, f in feats.items():
        damping = args.rel_damping * mean_eigenvalue(f["train"])
        scores[key] = trak_scores(f["query"], f["train"], damping)

    print(
        f"\nTRAK (loss) featurization + scoring, damping = {args.rel_damping:g} x trace(F)/k;"
        " each path in its own process (peak RSS includes torch, model and gradients)"
    )
    head = (
        f"{'k':>5} {'path':32} {'grads s':>8} {'proj s':>8} {'speed-up':>8} "
        f"{'peak RSS GiB':>12} {'Spearman ours~traker':>21}"
    )
    print(head)
    print("-" * len(head))
    for dim in args.dims:
        o, t = res["ours", dim], res["traker", dim]
        rho = mean_spearman(scores["ours", dim], scores["traker", dim])
        speed = t["proj_s"] / o["proj_s"]
        print(
            f"{dim:5d} {'ours (' + o['kind'] + ', chunked)':32} {o['grad_s']:8.1f} "
            f"{o['proj_s']:8.1f} {speed:7.1f}x {o['peak_rss_gib']:12.2f} {rho:21.3f}"
        )
        print(
            f"{dim:5d} {'traker BasicProjector (' + t['kind'] + ')':32} {t['grad_s']:8.1f} "
            f"{t['proj_s']:8.1f} {'1.0x':>8} {t['peak_rss_gib']:12.2f} {'':>21}"
        )
    print()
    dims = sorted(args.dims)
    for i, a in enumerate(dims):
        for b in dims[i + 1 :]:
            rho = mean_spearman(scores["ours", a], scores["ours", b])
            print(f"Spearman ours k={a} ~ ours k={b}: {rho:.3f}")
    for dim in args.dims:
        path = Path(out) / f"traker_scorer_{dim}.pt"
        if path.exists():
            ts = torch.load(path)
            ours_on_same = scores["traker", dim]
            corr = torch.corrcoef(torch.stack([ts.flatten(), ours_on_same.flatten()]))[0, 1]
            print(
                f"k={dim}: traker's BasicScoreComputer (lambda_reg = N x damping) vs trak_scores"
                f" on the same features: Pearson {float(corr):.6f} (its scores are rescaled by"
                f" one positive constant), scorer {res['traker', dim]['traker_score_s']:.1f} s"
            )
    for dim in args.dims:
        t = res["traker", dim]
        print(f"k={dim}: traker sketch identical across calls: {t['same_sketch']}")
    if args.generators:
        generators(args)
    if args.options:
        options(args)


if __name__ == "__main__":
    main()
