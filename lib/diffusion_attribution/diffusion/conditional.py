"""Class-conditional DDPMs with classifier-free guidance (beyond the paper).

The noise model gets the class ``c`` of the image it denoises:

    eps_theta(x_t, t, c),   temb(t, c) = Linear(SiLU(Linear(emb(t)))) + E onehot(c),

the U-Net of :class:`~diffusion_attribution.diffusion.unet.UNet` with a class embedding ``E``
(a bias-free ``nn.Linear`` on the one-hot class, so K-FAC and every gradient cover it like any
other layer) added to its time embedding. Class ``K`` (one past the last real class) is the
*null* class, the unconditional model of classifier-free guidance (Ho & Salimans, 2022):
training replaces each example's class by the null class with probability ``p_uncond``
(condition dropout), so one network learns both ``eps(x_t, t, c)`` and ``eps(x_t, t, null)``.
A guided sample of class ``c`` uses, at every step of ancestral sampling,

    eps_w(x_t, t, c) = (1 + w) eps(x_t, t, c) - w eps(x_t, t, null)          (H&S eq. 6)

with guidance weight ``w`` (``w = 0``: the plain conditional model).

What a sample is attributed through: every measurement of a generated sample (its loss,
ELBO, trajectory log-probability, ...) is taken under the model's *conditional* distribution
``p_theta(x | c)`` of its class, unguided -- guidance is the sampling procedure, the
conditional model is what training shapes. A training example enters with its own class
(the class it was trained with; the dropout is a training-time device and is off elsewhere).

Every piece of the library that takes an eps-model ``(x_t, t) -> eps`` works on a
conditional model *bound* to one class (:func:`bound`): the per-example gradients, the
K-FAC fit and the measurements group their examples by class and bind each group's class
(``labels=`` of those functions), so the attribution code is the unconditional one.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import tqdm.auto
from torch import Tensor, nn

from diffusion_attribution.core.io import atomic_save, check_finite, load
from diffusion_attribution.core.sections import ModelConfig, TrainConfig
from diffusion_attribution.diffusion.ddpm import NoiseSchedule, q_sample, sample_timesteps
from diffusion_attribution.diffusion.training import TrainResult, lr_lambda
from diffusion_attribution.diffusion.unet import UNet, UNetConfig

__all__ = [
    "ConditionalUNet",
    "bound",
    "build_conditional",
    "class_groups",
    "class_runs",
    "guided",
    "is_conditional",
    "load_conditional",
    "num_classes",
    "per_class",
    "save_conditional",
    "train_conditional",
]


class ConditionalUNet(UNet):
    """``eps_theta(x_t, t, c)``: :class:`~diffusion_attribution.diffusion.unet.UNet` with the
    class embedding ``class_in`` (``Linear(K + 1, 4 C, bias=False)`` on ``onehot(c)``) added
    to its time embedding; class ``num_classes`` is the null class.

    ``forward(x, t, y)``: ``y`` a class id (int), a ``(B,)`` tensor of ids, or ``None`` for
    the class bound by :func:`bound` (an error when none is bound, so a conditional model
    is never silently evaluated without its class).
    """

    def __init__(self, config: UNetConfig, num_classes: int):
        super().__init__(config)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.class_in = nn.Linear(num_classes + 1, 4 * config.base_channels, bias=False)
        self.bound_class: int | None = None
        self._classes: Tensor | None = None
        # temb(t, c) = temb_out(...) + E onehot(c): added where the time embedding is made
        self.temb_out.register_forward_hook(self._add_class)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def _add_class(self, module: nn.Module, inputs: tuple[Tensor, ...], temb: Tensor) -> Tensor:
        onehot = nn.functional.one_hot(self._classes, self.num_classes + 1).to(temb.dtype)
        return temb + self.class_in(onehot)

    def forward(self, x: Tensor, t: Tensor, y: int | Tensor | None = None) -> Tensor:
        """Predict the noise in ``x`` (B, C, H, W) at timesteps ``t`` given classes ``y``."""
        if y is None:
            if self.bound_class is None:
                raise ValueError(
                    "ConditionalUNet needs a class: pass y=, or call it inside "
                    "conditional.bound(model, c)"
                )
            y = self.bound_class
        y = torch.as_tensor(y, device=x.device, dtype=torch.int64)
        y = y.expand(x.shape[0]) if y.ndim == 0 else y
        if y.shape != (x.shape[0],):
            raise ValueError(f"y has shape {tuple(y.shape)}, need ({x.shape[0]},) or a scalar")
        if bool(((y < 0) | (y > self.num_classes)).any()):
            raise ValueError(f"class ids must lie in 0..{self.num_classes} (the null class)")
        self._classes = y
        try:
            return super().forward(x, t)
        finally:
            self._classes = None


@contextlib.contextmanager
def bound(model: nn.Module, c: int):
    """Within the block, ``model(x_t, t)`` is ``model(x_t, t, c)``: the conditional model
    bound to class ``c``, an ordinary eps-model for the rest of the library."""
    if not isinstance(model, ConditionalUNet):
        raise TypeError(f"bound needs a ConditionalUNet, got {type(model).__name__}")
    previous, model.bound_class = model.bound_class, int(c)
    try:
        yield model
    finally:
        model.bound_class = previous


def class_groups(labels: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``(c, ids)`` for each class present in ``labels`` (ascending), ``ids`` the positions of
    its examples in ascending order."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    for c in torch.unique(labels).tolist():
        yield int(c), torch.nonzero(labels == c).flatten()


def per_class(model: ConditionalUNet, labels: Tensor, fn) -> Tensor:
    """``fn(ids)`` (a tensor with ``len(ids)`` rows) for the examples ``ids`` of each class in
    ``labels``, evaluated with ``model`` bound to that class, put back in the examples' order."""
    out = None
    for c, ids in class_groups(labels):
        with bound(model, c):
            part = fn(ids)
        if out is None:
            out = part.new_empty((len(labels), *part.shape[1:]))
        out[ids.to(out.device)] = part
    return out


def class_runs(labels: Tensor) -> Iterator[tuple[int, slice]]:
    """``(c, rows)`` for each maximal run of equal consecutive labels, in order (one run per
    class for a class-sorted set)."""
    labels = torch.as_tensor(labels).tolist()
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            yield int(labels[start]), slice(start, i)
            start = i


def guided(model: ConditionalUNet, classes: Tensor, weight: float):
    """The guided eps-model ``(x_t, t) -> (1 + w) eps(x_t, t, c) - w eps(x_t, t, null)`` for
    the rows of one batch of ``len(classes)`` images (H&S eq. 6; ``w = 0``: conditional). For
    :func:`~diffusion_attribution.diffusion.ddpm.sample` with ``batch_size=None`` (every
    sample in one call, so the rows are ``classes``' rows)."""
    classes = torch.as_tensor(classes, dtype=torch.int64)

    def eps(x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] != len(classes):
            raise ValueError(f"guided: {x.shape[0]} rows for {len(classes)} classes")
        y = classes.to(x.device)
        cond = model(x, t, y)
        if weight == 0:
            return cond
        return (1 + weight) * cond - weight * model(x, t, torch.full_like(y, model.null_class))

    return eps


def num_classes(ds) -> int:
    """The number of classes a conditional model of the dataset ``ds`` embeds: its largest
    class id plus one (class ids are the dataset's own, e.g. 3 and 8 of digits-2)."""
    return int(ds.labels.max()) + 1


def build_conditional(
    model_cfg: ModelConfig, image_shape: tuple[int, int, int], num_classes: int
) -> ConditionalUNet:
    """The conditional U-Net of ``model_cfg`` for images of shape (C, H, W) (square)."""
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"the U-Net needs square images, got {h}x{w}")
    config = UNetConfig(in_channels=c, image_size=h, **model_cfg.model_dump())
    return ConditionalUNet(config, num_classes)


def save_conditional(
    path: str | Path, model: ConditionalUNet, model_cfg: ModelConfig, image_shape: tuple[int, ...]
) -> None:
    """Weights plus what rebuilds the network (``num_classes`` marks it conditional)."""
    atomic_save(
        {
            "state_dict": model.state_dict(),
            "model_config": model_cfg.model_dump(mode="json"),
            "image_shape": list(image_shape),
            "num_classes": model.num_classes,
        },
        path,
    )


def is_conditional(path: str | Path) -> bool:
    """Whether the model file at ``path`` holds a :class:`ConditionalUNet`."""
    return "num_classes" in torch.load(path, map_location="cpu", weights_only=True)


def load_conditional(path: str | Path, device: torch.device | str = "cpu") -> ConditionalUNet:
    """A model saved by :func:`save_conditional`, checked (a corrupt file or a non-finite
    weight raises, naming the file), in eval mode."""
    state = load(path, "model")
    check_finite(state["state_dict"], f"load_conditional({path})")
    if "num_classes" not in state:
        raise ValueError(f"{path} holds an unconditional U-Net (no num_classes)")
    model = build_conditional(
        ModelConfig(**state["model_config"]), tuple(state["image_shape"]), state["num_classes"]
    )
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval()


def train_conditional(
    model_fn,
    images: Tensor,
    labels: Tensor,
    schedule: NoiseSchedule,
    cfg: TrainConfig,
    p_uncond: float,
    *,
    checkpoint_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "training (conditional)",
) -> TrainResult:
    """Train ``model_fn()`` (a :class:`ConditionalUNet`, built after seeding with
    ``cfg.seed``) on ``images`` (N, C, H, W) with classes ``labels`` (N,), dropping each
    example's class to the null class with probability ``p_uncond``.

    The loop of :func:`~diffusion_attribution.diffusion.training.train_stack` for one run:
    AdamW, linear warm-up then cosine, gradient-norm clipping, EMA; the batch order from a
    generator seeded with ``seed + 1``, the (t, eps) draws from ``seed + 2`` and the dropout
    draws from ``seed + 3``. With ``checkpoint_path`` the state is saved every
    ``cfg.checkpoint_every`` steps and at the end and resumed from, ending with the same
    weights as an uninterrupted run.
    """
    if images.ndim != 4 or len(images) == 0 or labels.shape != (len(images),):
        raise ValueError(
            f"need non-empty images (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if not 0.0 <= p_uncond < 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond}")
    torch.manual_seed(cfg.seed)
    model = model_fn().to(device)
    if not isinstance(model, ConditionalUNet):
        raise TypeError("train_conditional: model_fn must build a ConditionalUNet")
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    gens = {k: torch.Generator().manual_seed(cfg.seed + i) for i, k in enumerate("bnd", 1)}
    n, bs = len(images), min(cfg.batch_size, len(images))
    perm, pos, step, losses, seconds = torch.randperm(n, generator=gens["b"]), 0, 0, [], 0.0
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        with torch.no_grad():
            for e, saved in zip(ema, state["ema"], strict=True):
                e.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        for k, g in gens.items():
            g.set_state(state["generators"][k])
        perm, pos, step = state["perm"], state["pos"], state["step"]
        losses, seconds = list(state["losses"]), state["seconds"]
    model.train()
    bar = tqdm.auto.tqdm(
        total=cfg.steps, initial=step, desc=desc, disable=not progress, mininterval=2
    )
    start = time.perf_counter() - seconds
    while step < cfg.steps:
        if pos + bs > n:  # new epoch: reshuffle
            perm, pos = torch.randperm(n, generator=gens["b"]), 0
        ids = perm[pos : pos + bs]
        pos += bs
        x0, y = images[ids], labels[ids].clone()
        t = sample_timesteps(bs, schedule.num_timesteps, gens["n"])
        eps = torch.randn(x0.shape, generator=gens["n"])
        y[torch.rand(bs, generator=gens["d"]) < p_uncond] = model.null_class  # condition dropout
        x0, t, eps, y = x0.to(device), t.to(device), eps.to(device), y.to(device)
        out = model(q_sample(schedule, x0, t, eps), t, y)
        loss = (eps - out).pow(2).mean()  # eq. 3, per-pixel mean as in training
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                if step == 0:  # the first update copies, as in training
                    e.copy_(p)
                else:
                    e.lerp_(p, 1.0 - cfg.ema_decay)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            seconds = time.perf_counter() - start
            atomic_save(
                {
                    "model": model.state_dict(),
                    "ema": ema,
                    "optimizer": opt.state_dict(),
                    "lr_schedule": sched.state_dict(),
                    "generators": {k: g.get_state() for k, g in gens.items()},
                    "perm": perm,
                    "pos": pos,
                    "step": step,
                    "losses": losses,
                    "seconds": seconds,
                },
                ckpt,
            )
    bar.close()
    ema_model = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(ema_model.parameters(), ema, strict=True):
            p.copy_(e)
    return TrainResult(
        model=model.eval(),
        ema_model=ema_model.eval(),
        losses=losses,
        seconds=time.perf_counter() - start,
    )
