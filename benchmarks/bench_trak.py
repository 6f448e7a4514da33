"""TRAK projection: our seeded chunked projector against traker 0.3.2's CPU projector.

On the same per-example gradients (TRAK: diffusion loss, training rows scaled to lbar = l / D)
of the digits-2 training set (sklearn digits 3 and 8, N = 357) and Q generated queries, for
each projection dimension k this runs, each in its own process (so each peak RSS is that
path's own, model and imports included):

* ours: :func:`diffusion_attribution.projection.featurize` with
  :class:`~diffusion_attribution.projection.Projector` (Rademacher, regenerated chunk by chunk,
  gradients buffered per call);
* traker: :class:`trak.projectors.BasicProjector` (``proj_type`` normal -- what ``TRAKer``
  picks on CPU -- float32), called per batch of 32 gradients as ``TRAKer.featurize`` does with
  its default ``proj_max_batch_size``; its output is divided by sqrt(k) to match our scaling.

and prints the wall time of the gradient and projection parts, the projection speed-up, the
peak RSS, and the agreement (mean over queries of the Spearman correlation across training
examples) of the TRAK scores from the two sketches at the same normalised damping (scores for
both from :func:`~diffusion_attribution.trak.trak_scores`; traker's own score computer is run
too and compared on the same features, which checks :func:`~diffusion_attribution.trak.
trak_lambda`). Two sketches are independent random draws, so agreement is ~0.7-0.85, not 1.

traker pitfalls guarded (FACTS.md): one projector instance with a fixed ``model_id`` for
training and query gradients (its sketch is regenerated from stored generator states on every
call; a training row is projected again with the queries and must come out bit-identical);
``lambda_reg`` is set to N * damping > 0 (its default 0 inverts a singular X^T X when N < k);
``free_memory()`` (which deletes ``proj_matrix``) is never called.

Timing does not depend on the weights: ``outputs/train/model.pt`` is used if it exists, else a
randomly initialised TINY_DIGITS U-Net.

    python benchmarks/bench_trak.py                         # k = 8192 and 2048
    python benchmarks/bench_trak.py --dims 2048 --draws 8   # quicker
    python benchmarks/bench_trak.py --options               # also: projector design options
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
    from diffusion_attribution.data import load_digits
    from diffusion_attribution.ddpm import NoiseSchedule
    from diffusion_attribution.measurements import DiffusionLoss
    from diffusion_attribution.testing import TINY_DIGITS
    from diffusion_attribution.train import load_model
    from diffusion_attribution.unet import UNet, kfac_parameters

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
    from diffusion_attribution.influence import train_gradient_scale

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
        from diffusion_attribution.projection import Projector, featurize

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

        from diffusion_attribution.gradients import per_example_gradients

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

            from diffusion_attribution.trak import mean_eigenvalue, trak_lambda

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


def mean_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return sum(spearmanr(x, y)[0] for x, y in zip(a.numpy(), b.numpy(), strict=True)) / len(a)


def options(args: argparse.Namespace) -> None:
    """Projector design options on random gradients of the model's size (this process)."""
    from diffusion_attribution.projection import Projector

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
        for i in range(0, num_params, pr.chunk):
            pr.sketch_rows(i, i + pr.chunk, torch.empty(pr.chunk, dim))
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
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--queries-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        print(json.dumps(child(args)))
        return

    from diffusion_attribution.ddpm import sample
    from diffusion_attribution.trak import mean_eigenvalue, trak_scores

    load1 = os.getloadavg()[0]
    note = ""
    if args.threads == 0:
        args.threads = 1 if load1 > 0.5 else 2
        if args.threads == 1:
            note = f"machine busy (1-min load {load1:.1f} before start): 1 torch thread"
    torch.set_num_threads(args.threads)
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
    if args.options:
        options(args)


if __name__ == "__main__":
    main()
