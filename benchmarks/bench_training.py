"""Training speed: ms per model-step of the previous training loop and of ``train_stack``.

The workload is the retraining stages' (App. G.4-G.6): the default U-Net (``params.yaml``'s
``model`` section), batch ``train.batch_size`` (64) of 8x8 one-channel images, AdamW,
warm-up + cosine learning rate, gradient clipping at ``train.grad_clip``, EMA, one torch thread
per process (the retraining stages run one such process per core). Images are uniform in
[-1, 1] (the speed does not depend on them).

Timed side by side in one run, each after a warm-up:

* ``previous loop``: the loop the project trained with before ``train_stack`` (kept here as
  the reference): one ``UNet``, ``torch.optim.AdamW`` (its default single-tensor CPU path),
  ``nn.utils.clip_grad_norm_``, ``torch.optim.swa_utils.AveragedModel`` for the EMA;
* ``train_stack, M = m``: the library's loop (:func:`~diffusion_attribution.diffusion.training.
  train_stack`) training m models at once (fused AdamW, per-model clipping, one batched
  ``StackedUNet``); ``M = 1`` is how the full model trains, ``M = retrain.stack_size`` how
  the retraining stages do.

Printed per loop: ms per model-step, the speed-up over the previous loop, and the ratio to the
arithmetic floor -- FLOPs of one forward + backward (``torch.utils.flop_counter``) divided by
this machine's one-thread float32 GEMM rate (a 1024^3 ``torch.mm``, best of 5).

With ``--workers W`` every loop runs in W processes at once, one thread each, started together
(the retraining stages run two such workers on the two cores); the times are the workers'
mean, and the GEMM rate is measured the same way (W products at once), so the floor is the
one a worker has while the others run.

    python benchmarks/bench_training.py                 # about 2 minutes on one core
    python benchmarks/bench_training.py --stacks 1 4 8 16 --steps 80
    python benchmarks/bench_training.py --workers 2     # as the retraining stages run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode

from diffusion_attribution.core.sections import ModelConfig, TrainConfig
from diffusion_attribution.diffusion.ddpm import NoiseSchedule, q_sample, sample_timesteps
from diffusion_attribution.diffusion.training import build_model, lr_lambda, train_stack

SHAPE = (1, 8, 8)


def gemm_rate() -> float:
    """FLOP/s of a one-thread float32 1024^3 matrix product (best of 5)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


def step_flops(model_cfg: ModelConfig, batch: int) -> int:
    """FLOPs of one forward + backward of the loss of eq. 3 on a batch."""
    net = build_model(model_cfg, SHAPE)
    x, t = torch.randn(batch, *SHAPE), torch.randint(1, 1000, (batch,))
    with FlopCounterMode(display=False) as counter:
        (net(x, t) - x).pow(2).mean().backward()
    return counter.get_total_flops()


def previous_loop(model_cfg, images, schedule, cfg: TrainConfig, steps: int) -> float:
    """Seconds for ``steps`` steps of the loop the project used before ``train_stack``."""
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, SHAPE)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    g_batch, g_noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    n, bs = len(images), min(cfg.batch_size, len(images))
    perm, pos = torch.randperm(n, generator=g_batch), 0
    start = time.perf_counter()
    for _ in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g_batch), 0
        x0 = images[perm[pos : pos + bs]]
        pos += bs
        t = sample_timesteps(bs, schedule.num_timesteps, g_noise)
        eps = torch.randn(x0.shape, generator=g_noise)
        loss = (eps - model(q_sample(schedule, x0, t, eps), t)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update_parameters(model)
        loss.item()
    return time.perf_counter() - start


def stacked_loop(model_cfg, images, schedule, cfg: TrainConfig, steps: int, m: int) -> float:
    """Seconds for ``steps`` steps of ``train_stack`` with ``m`` models (m subsets)."""
    g = torch.Generator().manual_seed(0)
    sets = [images[torch.randperm(len(images), generator=g)[: len(images) // 2]] for _ in range(m)]
    cfgs = [cfg.model_copy(update={"steps": steps, "seed": 100 + i}) for i in range(m)]
    start = time.perf_counter()
    train_stack(lambda: build_model(model_cfg, SHAPE), sets, schedule, cfgs, progress=False)
    return time.perf_counter() - start


def _setup(path: str):
    """The model and training sections of ``path``, its noise schedule and the images."""
    params = yaml.safe_load(open(path))
    model_cfg = ModelConfig(**params["model"])
    cfg = TrainConfig(**{**params["train"], "steps": 1000, "warmup_steps": 10})
    schedule = NoiseSchedule.linear(
        **{k: params["diffusion"][k] for k in ("num_timesteps", "beta_start", "beta_end")}
    )
    images = torch.rand(357, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return model_cfg, images, schedule, cfg


def timed(path: str, loop: str, steps: int, m: int) -> float:
    """Seconds per model-step of one loop (``"previous"``, ``"stack"`` with ``m`` models, or
    ``"gemm"``: seconds of one 1024^3 product), after a warm-up, on one thread."""
    torch.set_num_threads(1)
    if loop == "gemm":
        return 2 * 1024**3 / gemm_rate()
    model_cfg, images, schedule, cfg = _setup(path)
    if loop == "previous":
        previous_loop(model_cfg, images, schedule, cfg, 10)  # warm-up
        return previous_loop(model_cfg, images, schedule, cfg, steps) / steps
    stacked_loop(model_cfg, images, schedule, cfg, 5, m)  # warm-up
    return stacked_loop(model_cfg, images, schedule, cfg, steps, m) / (steps * m)


def _worker(barrier, queue, args) -> None:
    barrier.wait()  # every worker builds its inputs first, then all start at once
    queue.put(timed(*args))


def timed_together(workers: int, *args) -> float:
    """:func:`timed` in ``workers`` processes at once (spawned, one thread each): their mean."""
    if workers == 1:
        return timed(*args)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(barrier, queue, args)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    times = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    return sum(times) / len(times)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--steps", type=int, default=60, help="timed steps per loop")
    p.add_argument("--stacks", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--workers", type=int, default=1, help="processes running each loop at once (1 thread each)"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    model_cfg, _, _, cfg = _setup(args.params)
    w = args.workers
    flops = step_flops(model_cfg, cfg.batch_size)
    rate = 2 * 1024**3 / timed_together(w, args.params, "gemm", 0, 0)
    floor = flops / rate
    print(
        f"one model-step: {flops / 1e9:.2f} GFLOP; at a worker's one-thread GEMM rate "
        f"({rate / 1e9:.0f} GFLOP/s, {w} worker(s) at once) {floor * 1e3:.1f} ms (the floor)"
    )
    old = timed_together(w, args.params, "previous", args.steps, 1)
    rows = [("previous loop", old)]
    for m in args.stacks:
        rows.append(
            (f"train_stack, M = {m}", timed_together(w, args.params, "stack", args.steps, m))
        )
    print(f"{w} worker(s) at once, one thread each; mean over the workers")
    print(f"{'loop':24s} {'ms / model-step':>16s} {'speed-up':>9s} {'x floor':>8s}")
    for name, sec in rows:
        print(f"{name:24s} {sec * 1e3:16.2f} {old / sec:8.2f}x {sec / floor:7.1f}x")


if __name__ == "__main__":
    main()
