"""Paper-scale throughput of every expensive operation, for one short GPU run.

The Ho et al. (2020) CIFAR-10 U-Net (35.7 M parameters, the ``cifar2`` / ``cifar10``
profiles' model) on random CIFAR-2-shaped data (32x32x3 in [-1, 1]; throughput does not depend
on the pixels), on ``--device`` (default ``DA_DEVICE``, else ``cuda`` if available):

* ``train``: AdamW + clipping + EMA steps per second at batch 128 (``train.train_ddpm``);
* ``sample``: 1000-step ancestral sampling of a batch with the trajectory recorded
  (``ddpm.sample``, as the ``sample`` stage);
* ``gradients``: per-example gradients of the diffusion loss (examples/s and (example, draw)
  rows/s at the influence stage's batch size with D draws each, ``gradients``);
* ``kfac_fit``: ``curvature.fit_kfac`` (MC / expand) at two row counts, giving the rows/s of the
  factor pass and the fixed cost (eigendecompositions);
* ``projection``: ``projection.Projector.project`` of a batch of gradients at k = 32768;
* ``scoring``: preconditioning of query gradients (``KFAC.inverse_apply_sweep``), int8
  compression and the score matmuls (``influence.influence_scores``);
* ``kronfluence``: the same per-example-gradient + K-FAC workload through kronfluence 1.0.1
  (factors, then pairwise scores), if it is importable.

Every number goes to ``OUT/gpu_paper_scale.json`` as soon as it is measured, so a run cut short
keeps what it finished. Each section has a time guard (``--budget`` seconds in all, shared out
by fixed weights; a section that would run past its share is extrapolated from a shorter
run and says so, or is skipped with the reason). ``--tiny`` runs every section with small
counts and a small U-Net (for the CPU test, ~1 minute); ``--probe`` the paper's U-Net with
counts a CPU measures in about 10 minutes (the rates of ``benchmarks/paper_scale_cost.py``).

    python benchmarks/gpu_paper_scale.py --out $OUT                  # one H200/H100: ~8 min
    python benchmarks/gpu_paper_scale.py --tiny --device cpu --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_attribution.attribution.influence import (
    compress,
    influence_scores,
    train_gradient_scale,
)
from diffusion_attribution.attribution.projection import Projector
from diffusion_attribution.core.sections import TrainConfig
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.diffusion.ddpm import NoiseSchedule, draw_noise
from diffusion_attribution.diffusion.ddpm import sample as ancestral_sample
from diffusion_attribution.diffusion.gradients import per_example_gradients
from diffusion_attribution.diffusion.measurements import DiffusionLoss
from diffusion_attribution.diffusion.training import train_ddpm
from diffusion_attribution.diffusion.unet import (
    HO_CIFAR10,
    UNet,
    UNetConfig,
    kfac_parameters,
    num_parameters,
)


@dataclass(frozen=True)
class Scale:
    """Counts of one run: the paper's (App. G) or ``--tiny``."""

    model: UNetConfig
    train_batch: int
    train_steps: int
    sample_batch: int
    sample_steps: int
    grad_batch: int
    grad_draws: int
    draw_chunk: int
    grad_batches: int
    kfac_examples: tuple[int, int]
    kfac_draws: int
    kfac_batch: int
    proj_dim: int
    proj_batch: int
    queries: int
    dampings: tuple[float, ...]
    score_train: int
    kron_examples: int
    kron_queries: int


PAPER = Scale(
    model=HO_CIFAR10,
    train_batch=128,
    train_steps=30,
    sample_batch=200,  # sample.batch_size of the cifar2 profile
    sample_steps=1000,
    grad_batch=8,  # influence.batch_size
    grad_draws=250,  # influence.train_draws
    draw_chunk=64,  # influence.attribute's default
    grad_batches=3,
    kfac_examples=(8, 128),
    kfac_draws=16,  # curvature.num_draws
    kfac_batch=256,  # curvature.batch_size
    proj_dim=32768,  # trak.projection_dim
    proj_batch=32,
    queries=16,
    dampings=(1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),  # influence.damping_sweep
    score_train=512,
    kron_examples=64,
    kron_queries=8,
)

TINY = Scale(
    model=UNetConfig(
        in_channels=3,
        image_size=32,
        base_channels=16,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(16,),
        dropout=0.1,
        norm_groups=4,
    ),
    train_batch=4,
    train_steps=3,
    sample_batch=2,
    sample_steps=20,
    grad_batch=2,
    grad_draws=2,
    draw_chunk=2,
    grad_batches=1,
    kfac_examples=(2, 4),
    kfac_draws=2,
    kfac_batch=8,
    proj_dim=256,
    proj_batch=4,
    queries=2,
    dampings=(1e-8, 1e-3),
    score_train=8,
    kron_examples=4,
    kron_queries=2,
)

#: The paper's model with counts a CPU measures in minutes (``--probe``): the per-unit rates
#: ``benchmarks/paper_scale_cost.py`` turns into hours per stage.
PROBE = Scale(
    model=HO_CIFAR10,
    train_batch=16,
    train_steps=3,
    sample_batch=16,
    sample_steps=2,
    grad_batch=2,
    grad_draws=4,
    draw_chunk=4,
    grad_batches=3,
    kfac_examples=(2, 18),
    kfac_draws=2,
    kfac_batch=16,
    proj_dim=32768,
    proj_batch=2,
    queries=2,
    dampings=(1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    score_train=8,
    kron_examples=4,
    kron_queries=2,
)

#: Share of ``--budget`` per section (the rest is slack for set-up and transfers).
WEIGHTS = {
    "train": 0.07,
    "sample": 0.18,
    "gradients": 0.10,
    "kfac_fit": 0.20,
    "projection": 0.12,
    "scoring": 0.08,
    "kronfluence": 0.15,
}


class SectionTimeout(Exception):
    """A section ran past its hard limit (SIGALRM)."""


@contextmanager
def hard_limit(seconds: float):
    """Raise :class:`SectionTimeout` after ``seconds`` (main thread, between Python bytecodes;
    a long kernel call is interrupted when it returns)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def alarm(signum, frame):
        raise SectionTimeout(f"hard limit of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Report:
    """The JSON file, rewritten atomically after every change."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = {**header, "sections": {}}
        self.write()

    def section(self, name: str, **values) -> None:
        self.data["sections"].setdefault(name, {}).update(values)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---- sections ------------------------------------------------------------------------------


def bench_train(ctx, budget: float) -> dict:
    s, dev = ctx["scale"], ctx["device"]
    images = ctx["images"]
    schedule = NoiseSchedule.linear(1000)

    def cfg(steps: int) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            batch_size=s.train_batch,
            lr=2e-4,
            warmup_steps=1,
            grad_clip=1.0,
            ema_decay=0.9999,
            checkpoint_every=10**6,
        )

    def build():
        return UNet(s.model)

    # warm-up (allocator, cuDNN autotuning); its pace bounds the steps that fit the budget
    warm = train_ddpm(build, images, schedule, cfg(2), device=dev, progress=False)
    per_step_upper = warm.seconds / 2
    del warm
    steps = max(2, min(s.train_steps, int(0.6 * budget / max(per_step_upper, 1e-6))))
    reset_peak(dev)
    result = train_ddpm(build, images, schedule, cfg(steps), device=dev, progress=False)
    sync(dev)
    return {
        "batch_size": s.train_batch,
        "steps": steps,
        "seconds": round(result.seconds, 3),
        "steps_per_second": round(steps / result.seconds, 4),
        "images_per_second": round(steps * s.train_batch / result.seconds, 2),
        "note": "includes model build, AdamW, clipping and EMA (train.train_ddpm)",
        "peak_memory_gib": peak_memory_gib(dev),
    }


def bench_sample(ctx, budget: float) -> dict:
    s, dev, model = ctx["scale"], ctx["device"], ctx["model"]
    shape = (3, s.model.image_size, s.model.image_size)
    probe_steps = 10 if s.sample_steps > 10 else s.sample_steps
    reset_peak(dev)
    t0 = time.perf_counter()
    ancestral_sample(
        model,
        NoiseSchedule.linear(probe_steps),
        s.sample_batch,
        shape,
        seed=1,
        device=dev,
        record_trajectory=True,
    )
    sync(dev)
    per_step = (time.perf_counter() - t0) / probe_steps
    out = {
        "batch_size": s.sample_batch,
        "probe_steps": probe_steps,
        "probe_seconds_per_step": round(per_step, 5),
    }
    if per_step * s.sample_steps > 0.8 * budget:
        out.update(
            steps=s.sample_steps,
            seconds=round(per_step * s.sample_steps, 2),
            extrapolated=True,
            note=f"{s.sample_steps} steps would exceed the section's {budget:.0f} s: extrapolated",
        )
        return out
    t0 = time.perf_counter()
    ancestral_sample(
        model,
        NoiseSchedule.linear(s.sample_steps),
        s.sample_batch,
        shape,
        seed=1,
        device=dev,
        record_trajectory=True,
    )
    sync(dev)
    seconds = time.perf_counter() - t0
    out.update(
        steps=s.sample_steps,
        seconds=round(seconds, 3),
        images_per_second_full_chain=round(s.sample_batch / seconds, 4),
        extrapolated=False,
        peak_memory_gib=peak_memory_gib(dev),
    )
    return out


def bench_gradients(ctx, budget: float) -> dict:
    s, dev, model = ctx["scale"], ctx["device"], ctx["model"]
    params, loss = ctx["params"], ctx["loss"]
    n = s.grad_batch * s.grad_batches
    x = ctx["images"][:n]
    draws = loss.draw(x, torch.arange(n), s.grad_draws, seed=3)
    scale = train_gradient_scale(x[0].numel())
    reset_peak(dev)
    times = []
    start = time.perf_counter()
    stream = per_example_gradients(
        model,
        params,
        loss,
        x,
        draws,
        batch_size=s.grad_batch,
        draw_chunk=s.draw_chunk,
        scale=scale,
    )
    t0 = time.perf_counter()
    for _, g in stream:
        sync(dev)
        if not torch.isfinite(g).all():
            raise FloatingPointError("non-finite per-example gradients")
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        if time.perf_counter() - start > 0.8 * budget:
            break
    steady = times[1:] or times  # the first batch pays the warm-up
    per_batch = sum(steady) / len(steady)
    return {
        "batch_size": s.grad_batch,
        "draws": s.grad_draws,
        "draw_chunk": s.draw_chunk,
        "batches": len(times),
        "seconds_per_batch": [round(t, 4) for t in times],
        "examples_per_second": round(s.grad_batch / per_batch, 4),
        "rows_per_second": round(s.grad_batch * s.grad_draws / per_batch, 2),
        "peak_memory_gib": peak_memory_gib(dev),
    }


def bench_kfac_fit(ctx, budget: float) -> dict:
    s, dev, model = ctx["scale"], ctx["device"], ctx["model"]
    params = ctx["params"]
    schedule = NoiseSchedule.linear(1000)
    shape = ctx["images"].shape[1:]
    fits = []
    deadline = time.perf_counter() + 0.85 * budget
    for n in s.kfac_examples:
        if fits and time.perf_counter() + 2 * fits[-1]["seconds"] > deadline:
            fits.append({"examples": n, "skipped": "would exceed the section's budget"})
            break
        t, eps = draw_noise(n, s.kfac_draws, tuple(shape), 1000, seed=2)
        reset_peak(dev)
        t0 = time.perf_counter()
        K = fit_kfac(
            model,
            params,
            schedule,
            ctx["images"][:n].to(dev),
            t.to(dev),
            eps.to(dev),
            fisher="mc",
            kfac="expand",
            batch_size=s.kfac_batch,
            mc_seed=2,
            precision="float32",  # curvature.precision of the paper-scale profiles
        )
        sync(dev)
        seconds = time.perf_counter() - t0
        fits.append(
            {
                "examples": n,
                "rows": n * s.kfac_draws,
                "seconds": round(seconds, 3),
                "peak_memory_gib": peak_memory_gib(dev),
            }
        )
        ctx["kfac"] = K
    done = [f for f in fits if "seconds" in f]
    out = {"draws": s.kfac_draws, "batch_size": s.kfac_batch, "precision": "float32", "fits": fits}
    if len(done) == 2:
        (a, b) = done
        per_row = (b["seconds"] - a["seconds"]) / (b["rows"] - a["rows"])
        out["rows_per_second"] = round(1.0 / per_row, 2) if per_row > 0 else None
        out["fixed_seconds"] = round(a["seconds"] - per_row * a["rows"], 3)
    else:
        out["rows_per_second_upper_bound_of_cost"] = round(done[0]["rows"] / done[0]["seconds"], 2)
    return out


def bench_projection(ctx, budget: float) -> dict:
    s, dev = ctx["scale"], ctx["device"]
    P = ctx["num_kfac_params"]
    g = torch.randn(s.proj_batch, P, device=dev)
    out = {"batch_size": s.proj_batch, "num_params": P}
    # probe at a smaller k (cost ~ P * k), then k itself if it fits
    probe_k = max(64, s.proj_dim // 16)
    reset_peak(dev)
    t0 = time.perf_counter()
    Projector(P, probe_k, seed=4, cache_bytes=0).project(g)
    sync(dev)
    probe = time.perf_counter() - t0
    out.update(probe_dim=probe_k, probe_seconds=round(probe, 3))
    predicted = probe * s.proj_dim / probe_k
    if predicted > 0.8 * budget:
        out.update(
            dim=s.proj_dim,
            seconds_per_batch=round(predicted, 2),
            extrapolated=True,
            note="k = proj_dim would exceed the section's budget: extrapolated linearly in k",
        )
        return out
    proj = Projector(P, s.proj_dim, seed=4, cache_bytes=0)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        phi = proj.project(g)
        sync(dev)
        times.append(time.perf_counter() - t0)
        if sum(times) > 0.5 * budget:
            break
    if not torch.isfinite(phi).all():
        raise FloatingPointError("non-finite projections")
    out.update(
        dim=s.proj_dim,
        seconds_per_batch=round(min(times), 3),
        seconds=[round(t, 3) for t in times],
        extrapolated=False,
        note="sketch regenerated on every call (cache_bytes=0), as when P * k * 4 bytes exceed the cache",
        peak_memory_gib=peak_memory_gib(dev),
    )
    return out


def bench_scoring(ctx, budget: float) -> dict:
    s, dev = ctx["scale"], ctx["device"]
    K = ctx.get("kfac")
    if K is None:
        return {"status": "skipped", "reason": "no K-FAC fitted (kfac_fit section failed)"}
    K = K.to(dev)
    P = ctx["num_kfac_params"]
    shapes = [p.shape for p in ctx["params"]]
    q = torch.randn(s.queries, P, device=dev)
    reset_peak(dev)
    t0 = time.perf_counter()
    solved = K.inverse_apply_sweep(q, list(s.dampings))
    sync(dev)
    t_sweep = time.perf_counter() - t0
    t0 = time.perf_counter()
    pre = {d: compress(v, "int8", shapes) for d, v in solved.items()}
    sync(dev)
    t_compress = time.perf_counter() - t0
    del solved
    g = torch.randn(s.score_train, P, device=dev)
    chunk = max(1, s.score_train // 4)

    def stream():
        for i in range(0, s.score_train, chunk):
            yield slice(i, min(i + chunk, s.score_train)), g[i : i + chunk]

    t0 = time.perf_counter()
    scores = influence_scores(pre, stream(), s.score_train)
    sync(dev)
    t_score = time.perf_counter() - t0
    if not all(torch.isfinite(v).all() for v in scores.values()):
        raise FloatingPointError("non-finite scores")
    nd = len(s.dampings)
    return {
        "queries": s.queries,
        "dampings": nd,
        "precondition_sweep_seconds": round(t_sweep, 3),
        "precondition_seconds_per_query_per_damping": round(t_sweep / (s.queries * nd), 5),
        "int8_compress_seconds": round(t_compress, 3),
        "train_gradients_scored": s.score_train,
        "score_matmul_seconds": round(t_score, 3),
        "score_seconds_per_query_train_pair_per_matrix": t_score / (s.queries * s.score_train * nd),
        "note": "factors held in float32 on the device (curvature.precision of the profiles)",
        "peak_memory_gib": peak_memory_gib(dev),
    }


def bench_kronfluence(ctx, budget: float) -> dict:
    try:
        import kronfluence
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        return {"status": "skipped", "reason": f"kronfluence not importable: {err!r}"}
    s, dev = ctx["scale"], ctx["device"]
    schedule = NoiseSchedule.linear(1000)
    ab = schedule.alpha_bars.float().to(dev)
    draws = s.kfac_draws

    class DiffusionTask(Task):
        """The diffusion loss with ``draws`` pre-drawn (t, eps) per example (per-pixel mean).

        The model sees example-major (example, draw) rows, so kronfluence's per-sample
        gradients are per row; summing each example's ``draws`` rows makes them per example.
        """

        enable_post_process_per_sample_gradient = True

        def post_process_per_sample_gradient(self, module_name, gradient):
            return gradient.reshape(-1, draws, *gradient.shape[1:]).sum(1)

        def _loss(self, batch, model):
            x0, t, eps = batch
            x0, t, eps = x0.to(dev), t.to(dev), eps.to(dev)
            b, d = t.shape
            x = x0[:, None].expand(b, d, *x0.shape[1:]).reshape(b * d, *x0.shape[1:])
            e = eps.reshape(b * d, *x0.shape[1:])
            tt = t.reshape(-1)
            a = ab[tt].view(-1, 1, 1, 1)
            xt = a.sqrt() * x + (1 - a).sqrt() * e
            err = (model(xt, tt) - e).pow(2).flatten(1).mean(1)
            return err.reshape(b, d).mean(1)

        def compute_train_loss(self, batch, model, sample=False):
            if not sample:  # empirical Fisher
                return self._loss(batch, model).sum()
            # MC Fisher, as the project's fit: targets drawn from the model's Gaussian
            # (MSE has Hessian 2I: standard deviation sqrt(0.5)), as kronfluence's examples do
            x0, t, eps = (v.to(dev) for v in batch)
            b, d = t.shape
            x = x0[:, None].expand(b, d, *x0.shape[1:]).reshape(b * d, *x0.shape[1:])
            e = eps.reshape(b * d, *x0.shape[1:])
            tt = t.reshape(-1)
            a = ab[tt].view(-1, 1, 1, 1)
            out = model(a.sqrt() * x + (1 - a).sqrt() * e, tt)
            with torch.no_grad():
                target = out + math.sqrt(0.5) * torch.randn_like(out)
            return (out - target).pow(2).flatten(1).mean(1).sum() / d

        def compute_measurement(self, batch, model):
            return self._loss(batch, model).sum()

    class Rows(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            self.x = ctx["images"][:n].cpu()
            self.t, self.eps = draw_noise(n, draws, tuple(self.x.shape[1:]), 1000, seed=seed)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.t[i], self.eps[i]

    model = UNet(s.model).to(dev).eval()
    model.load_state_dict(ctx["model"].state_dict())
    task = DiffusionTask()
    model = prepare_model(model, task)
    train, query = Rows(s.kron_examples, 7), Rows(s.kron_queries, 8)
    out = {"version": kronfluence.__version__, "examples": s.kron_examples, "draws": draws}
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(
            "bench", model, task, output_dir=tmp, disable_tqdm=True, cpu=dev.type == "cpu"
        )
        fargs = FactorArguments(strategy="kfac")
        t0 = time.perf_counter()
        analyzer.fit_all_factors(
            "kfac",
            dataset=train,
            per_device_batch_size=s.grad_batch,
            factor_args=fargs,
            overwrite_output_dir=True,
        )
        sync(dev)
        out["factor_seconds"] = round(time.perf_counter() - t0, 3)
        out["factor_examples_per_second"] = round(s.kron_examples / out["factor_seconds"], 4)
        ctx["report"].section("kronfluence", **out)
        t0 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores",
            "kfac",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=s.kron_queries,
            per_device_train_batch_size=s.grad_batch,
            score_args=ScoreArguments(),
            overwrite_output_dir=True,
        )
        sync(dev)
        out["score_seconds"] = round(time.perf_counter() - t0, 3)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        out["score_shape"] = list(scores.shape)
        out["score_train_examples_per_second"] = round(s.kron_examples / out["score_seconds"], 4)
        if not torch.isfinite(scores).all():
            raise FloatingPointError("non-finite kronfluence scores")
    return out


SECTIONS = {
    "train": bench_train,
    "sample": bench_sample,
    "gradients": bench_gradients,
    "kfac_fit": bench_kfac_fit,
    "projection": bench_projection,
    "scoring": bench_scoring,
    "kronfluence": bench_kronfluence,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_paper_scale.json")
    ap.add_argument(
        "--device", default=None, help="torch device (default DA_DEVICE, else cuda/cpu)"
    )
    ap.add_argument("--tiny", action="store_true", help="small counts and U-Net (CPU test)")
    ap.add_argument(
        "--probe", action="store_true", help="the paper's U-Net with CPU-sized counts (rates)"
    )
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds in all (default 450; tiny 120)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    args = ap.parse_args(argv)
    device = torch.device(
        args.device
        or os.environ.get("DA_DEVICE")
        or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = TINY if args.tiny else PROBE if args.probe else PAPER
    budget = args.budget or (120.0 if args.tiny else 450.0)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = UNet(scale.model).to(device).eval()
    params = kfac_parameters(model)
    side = scale.model.image_size
    n_images = max(
        scale.train_batch,
        scale.grad_batch * scale.grad_batches,
        max(scale.kfac_examples),
        scale.kron_examples,
    )
    images = torch.rand(n_images, 3, side, side).mul_(2).sub_(1)
    header = {
        "script": "benchmarks/gpu_paper_scale.py",
        "tiny": args.tiny,
        "probe": args.probe,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "budget_seconds": budget,
        "model": {
            "config": scale.model.__dict__,
            "num_parameters": num_parameters(model),
            "num_kfac_parameters": sum(p.numel() for p in params),
        },
        "scale": {k: v for k, v in scale.__dict__.items() if k != "model"},
    }
    report = Report(args.out / "gpu_paper_scale.json", header)
    ctx = {
        "scale": scale,
        "device": device,
        "model": model,
        "params": params,
        "images": images.to(device),
        "loss": DiffusionLoss(NoiseSchedule.linear(1000)),
        "num_kfac_params": sum(p.numel() for p in params),
        "report": report,
    }
    start = time.perf_counter()
    for name, fn in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        share = WEIGHTS[name] * budget
        left = budget - (time.perf_counter() - start)
        if left < 0.25 * share:
            report.section(name, status="skipped", reason=f"total budget spent ({left:.0f} s left)")
            continue
        limit = min(share * 1.5, left)
        print(f"[{time.perf_counter() - start:6.1f} s] {name} (budget {share:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            with hard_limit(limit):
                values = fn(ctx, share)
            status = values.pop("status", "ok")
            report.section(
                name, status=status, wall_seconds=round(time.perf_counter() - t0, 2), **values
            )
        except Exception as err:  # noqa: BLE001 - record and go on to the next section
            report.section(
                name,
                status="timeout" if isinstance(err, SectionTimeout) else "error",
                error=repr(err),
                traceback=traceback.format_exc(limit=6)[-3000:],
                wall_seconds=round(time.perf_counter() - t0, 2),
            )
        print(json.dumps(report.data["sections"][name])[:600], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.data["total_seconds"] = round(time.perf_counter() - start, 2)
    report.write()
    print(f"wrote {report.path} in {report.data['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
