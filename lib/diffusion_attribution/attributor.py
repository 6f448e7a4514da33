"""Attribute a diffusion model of one's own in three lines: the :class:`Attributor` facade.

::

    attributor = da.Attributor.from_diffusers(unet, scheduler, train_images)
    scores = attributor.scores(queries)                   # K-FAC influence of the loss
    scores.top(5)                                         # the 5 most positive per query

It sits on the library's low-level functions, which the pipeline uses directly: the fit
(:func:`~diffusion_attribution.curvature.fit.fit_kfac`), K-FAC influence
(:func:`~diffusion_attribution.attribution.influence.attribute`, eq. 6) and the baselines
(:func:`~diffusion_attribution.attribution.baselines.baseline_scores`: TRAK, D-TRAK, gradient
similarity, pixel similarity). An :class:`Attributor` holds what does not change between
queries: the model (an eps-model ``(x_t, t) -> eps`` with ``t`` in 1..T, the library's
convention), its noise schedule, the training images and the parameters scored (the Linear and
Conv2d layers, :func:`~diffusion_attribution.diffusion.unet.kfac_parameters`). The curvature is
fitted once, on the first K-FAC score, with (t, eps) draws of its own
(:class:`FitSettings`); :meth:`Attributor.save_curvature` / :meth:`Attributor.load_curvature`
keep it across sessions.

Every score follows the library's one convention
(:mod:`diffusion_attribution.attribution.influence`): ``score[q, j] ~ m(theta_{-j}, x_q) -
m(theta, x_q)``, the change of measurement m on query q when training example j is removed.

Defaults
--------
:class:`ScoreSettings` defaults are the pipeline's (``params.yaml``): 256 (t, eps) draws per
training example and per query, int8-compressed preconditioned queries, and for the curvature
8 draws per example, MC Fisher, expand. Damping is *relative*: the absolute damping added to K
is ``damping * mean_eigenvalue(K)`` (``trace(K) / P``), so one default means the same on
models of any size or scale. The pipeline states its K-FAC damping in absolute terms instead
(``influence.damping``); ``ScoreSettings(relative_damping=False)`` does the same here. For
TRAK and D-TRAK the damping is relative to the projected empirical Fisher's mean eigenvalue,
as the pipeline's ``trak.relative_dampings`` are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_attribution.attribution.baselines import baseline_scores
from diffusion_attribution.attribution.das import OUTPUT_MEAN, OutputMean
from diffusion_attribution.attribution.influence import attribute
from diffusion_attribution.attribution.projection import Projector
from diffusion_attribution.attribution.scores import ScoreKey
from diffusion_attribution.attribution.similarity import pixel_similarity
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.curvature.kfac import KFAC
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import (
    Measurement,
    SquareNorm,
    make_measurement,
)
from diffusion_attribution.diffusion.unet import kfac_parameters

Method = Literal["kfac", "ekfac", "trak", "d-trak", "das", "grad_dot", "grad_cos", "pixel"]
METHODS: tuple[str, ...] = (
    "kfac", "ekfac", "trak", "d-trak", "das", "grad_dot", "grad_cos", "pixel",
)  # fmt: skip


@dataclass(frozen=True)
class FitSettings:
    """How the curvature K is fitted (the paper's Sec. 3.1; the pipeline's ``curvature``).

    ``fisher``: ``"mc"`` (GGN^model, one MC target per row) or ``"empirical"`` (GGN^loss);
    ``kfac``: ``"expand"`` or ``"reduce"`` (the weight-sharing treatment of convolutions and
    attention); ``draws``: (t, eps) draws per training example; ``seed``: of those draws (and
    of the MC targets); ``batch_size``: rows per forward pass (speed and memory only);
    ``precision``: of the eigendecompositions and the stored eigenbases (``"float32"`` halves
    the curvature's memory; ``tests/curvature/test_precision.py`` measures what it moves)."""

    fisher: Literal["mc", "empirical"] = "mc"
    kfac: Literal["expand", "reduce"] = "expand"
    draws: int = 8
    seed: int = 2
    batch_size: int = 512
    precision: Literal["float64", "float32"] = "float64"


@dataclass(frozen=True)
class ScoreSettings:
    """How a score matrix is computed (the pipeline's ``influence`` and ``trak`` sections).

    ``method``: ``"kfac"`` (K-FAC influence, eq. 6), ``"ekfac"`` (the same with EK-FAC's
    corrected eigenvalues), ``"trak"`` / ``"d-trak"`` (projected empirical Fisher; D-TRAK
    attributes the square norm whatever the measurement), ``"das"`` (DAS, Lin et al. 2025:
    gradients of the summed predicted noise times the training examples' RMS residuals,
    :mod:`~diffusion_attribution.attribution.das`), ``"grad_dot"`` / ``"grad_cos"``
    (projected gradient similarity), ``"pixel"`` (pixel-space kernel, no model).
    ``damping``: relative to the curvature's mean eigenvalue unless ``relative_damping`` is
    False (module docstring). ``train_draws`` / ``query_draws``: (t, eps) draws per gradient;
    ``compression``: of the preconditioned query gradients (``"int8"``, ``"int4"``,
    ``"none"``; K-FAC only); ``projection_dim``: k of the TRAK projection; ``seed``: of the
    draws (queries use ``seed + 1``) and the projection; ``batch_size``: examples per gradient
    pass (speed and memory only)."""

    method: Method = "kfac"
    damping: float = 1e-8
    relative_damping: bool = True
    train_draws: int = 256
    query_draws: int = 256
    compression: str = "int8"
    projection_dim: int = 2048
    seed: int = 3
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"ScoreSettings.method: unknown {self.method!r}; one of {METHODS}")
        if not self.damping >= 0:
            raise ValueError(f"ScoreSettings.damping must be >= 0, got {self.damping}")
        for name in ("train_draws", "query_draws", "projection_dim", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScoreSettings.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Attribution:
    """One score matrix and what produced it.

    ``matrix`` (Q, N) float32: ``matrix[q, j] ~ m(theta_{-j}, x_q) - m(theta, x_q)``;
    ``measurement`` the name of m; ``settings`` the :class:`ScoreSettings`; ``key`` the
    :class:`~diffusion_attribution.attribution.scores.ScoreKey` the pipeline would file it
    under (with the absolute damping); ``meta`` what the computation reported (timings,
    mean eigenvalues)."""

    matrix: Tensor
    measurement: str
    settings: ScoreSettings
    key: ScoreKey
    meta: dict = field(default_factory=dict)

    def top(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` most positive scores of each query and their training indices, each
        (Q, k), highest first: the examples whose removal would raise m the most (for the
        loss: those that helped the model fit the query)."""
        return self.matrix.topk(min(k, self.matrix.shape[1]), dim=1)

    def bottom(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` most negative scores of each query and their indices, lowest first."""
        values, idx = (-self.matrix).topk(min(k, self.matrix.shape[1]), dim=1)
        return -values, idx


class DiffusersEps(nn.Module):
    """A diffusers ``UNet2DModel`` as the library's eps-model: the library counts timesteps
    t = 1..T (``alpha_bars[t]``, index 0 is the clean image), diffusers 0..T-1, so the call is
    ``unet(x_t, t - 1).sample``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t - 1).sample


def schedule_from_betas(betas: Tensor) -> NoiseSchedule:
    """The :class:`~diffusion_attribution.diffusion.ddpm.NoiseSchedule` of a scheduler's
    ``betas`` (T,), indexed t = 0..T with a noise-free row at t = 0 (Ho et al.'s q(x_t | x_0)
    = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), alpha_bar_t = prod_{s <= t} (1 - beta_s))."""
    b = torch.cat([torch.zeros(1, dtype=torch.float64), torch.as_tensor(betas).double()])
    return NoiseSchedule(b, 1 - b, torch.cumprod(1 - b, 0))


class Attributor:
    """Training-data attribution for one trained diffusion model (module docstring).

    Args:
        model: eps-model ``(x_t, t) -> eps``, t in 1..T (:class:`DiffusersEps` adapts a
            diffusers U-Net; :meth:`from_diffusers` does it for you).
        schedule: its noise schedule (:meth:`NoiseSchedule.linear
            <diffusion_attribution.diffusion.ddpm.NoiseSchedule.linear>` or
            :func:`schedule_from_betas`).
        train_images: the training set (N, C, H, W), scaled as the model saw it.
        fit: how the curvature is fitted (:class:`FitSettings`).
        params: the parameters scored (default: every Linear / Conv2d weight and bias).
        variance, pixel_levels: of the ELBO and trajectory measurements (the reverse process'
            variance, ``"fixed_large"`` or ``"fixed_small"``, and the number of pixel values of
            the data's discretisation).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        train_images: Tensor,
        fit: FitSettings | None = None,
        *,
        params: list[nn.Parameter] | None = None,
        variance: Literal["fixed_large", "fixed_small"] = "fixed_large",
        pixel_levels: int = 256,
    ):
        if train_images.ndim != 4 or len(train_images) < 1:
            raise ValueError(
                f"train_images must be (N, C, H, W) with N >= 1, got {tuple(train_images.shape)}"
            )
        self.model = model.eval()
        self.schedule = schedule
        self.train_images = train_images
        self.fit_settings = fit or FitSettings()
        self.params = list(params) if params is not None else kfac_parameters(model)
        if not self.params:
            raise ValueError("the model has no Linear or Conv2d parameters to attribute through")
        self.variance = variance
        self.pixel_levels = pixel_levels
        self._curvatures: dict[bool, KFAC] = {}  # ekfac? -> fitted curvature

    @classmethod
    def from_diffusers(
        cls, unet: nn.Module, scheduler, train_images: Tensor, fit: FitSettings | None = None
    ) -> Attributor:
        """An :class:`Attributor` of a diffusers ``UNet2DModel`` trained with ``scheduler``
        (a ``DDPMScheduler``): the noise schedule is the scheduler's ``betas`` and the
        timestep convention is translated (:class:`DiffusersEps`)."""
        return cls(DiffusersEps(unet), schedule_from_betas(scheduler.betas), train_images, fit)

    # -- the curvature -----------------------------------------------------------------------

    def curvature(self, ekfac: bool = False) -> KFAC:
        """K-FAC (or EK-FAC) of the GGN over the training set, fitted on first use
        (:func:`~diffusion_attribution.curvature.fit.fit_kfac` with :class:`FitSettings`:
        ``draws`` (t, eps) per example from the diffusion loss' seeded per-example draws)."""
        if ekfac not in self._curvatures:
            fs = self.fit_settings
            loss = make_measurement("loss", self.schedule)
            ids = torch.arange(len(self.train_images))
            d = loss.draw(self.train_images, ids, fs.draws, seed=fs.seed)
            self._curvatures[ekfac] = fit_kfac(
                self.model,
                self.params,
                self.schedule,
                self.train_images,
                d["t"],
                d["eps"],
                fisher=fs.fisher,
                kfac=fs.kfac,
                ekfac=ekfac,
                batch_size=fs.batch_size,
                mc_seed=fs.seed,
                precision=fs.precision,
            )
        return self._curvatures[ekfac]

    def save_curvature(self, path: str | Path, ekfac: bool = False) -> None:
        """Save the fitted curvature (fitting it first if needed) to ``path``."""
        self.curvature(ekfac).save(path)

    def load_curvature(self, path: str | Path, ekfac: bool = False) -> KFAC:
        """Use the curvature saved at ``path`` instead of fitting one."""
        self._curvatures[ekfac] = KFAC.load(path, self.params)
        return self._curvatures[ekfac]

    # -- scores ------------------------------------------------------------------------------

    def measurement(self, name: str) -> Measurement:
        """The measurement m named ``name``: ``"loss"``, ``"elbo"``, ``"trajectory"``,
        ``"square_norm"`` or ``"l_t=<t>"`` (the paper's Sec. 3.3)."""
        if name == "elbo":
            levels = self.pixel_levels
            return make_measurement(name, self.schedule, variance=self.variance, levels=levels)
        if name == "trajectory":
            return make_measurement(name, self.schedule, variance=self.variance)
        return make_measurement(name, self.schedule)

    def scores(
        self,
        queries: Tensor,
        measurement: str = "loss",
        settings: ScoreSettings | None = None,
        *,
        trajectories: Tensor | None = None,
        progress: bool = False,
    ) -> Attribution:
        """The score matrix (Q, N) of ``queries`` (Q, C, H, W) for ``measurement``.

        ``trajectories`` (T + 1, Q, C, H, W): the queries' sampling trajectories, needed for
        ``measurement="trajectory"`` (:func:`~diffusion_attribution.diffusion.ddpm.sample`
        records them)."""
        s = settings or ScoreSettings()
        if queries.ndim != 4 or queries.shape[1:] != self.train_images.shape[1:]:
            raise ValueError(
                f"queries must be (Q, {', '.join(map(str, self.train_images.shape[1:]))}), "
                f"got {tuple(queries.shape)}"
            )
        if s.method in ("trak", "d-trak", "das") and not s.relative_damping:
            raise ValueError(
                "ScoreSettings.relative_damping: TRAK / D-TRAK / DAS dampings are relative to "
                "the projected curvature's mean eigenvalue; absolute ones are not supported"
            )
        if measurement == "trajectory" and trajectories is None:
            raise ValueError("measurement 'trajectory' needs the queries' trajectories")
        m = self.measurement(measurement)
        if s.method in ("kfac", "ekfac"):
            return self._influence(queries, m, s, trajectories, progress)
        return self._baseline(queries, m, s, trajectories, progress)

    def _influence(self, queries, m, s, trajectories, progress) -> Attribution:
        K = self.curvature(ekfac=s.method == "ekfac")
        scale = K.mean_eigenvalue()  # all P eigenvalues: computed once per score matrix
        damping = s.damping * scale if s.relative_damping else s.damping
        fs = self.fit_settings
        name = ("ekfac_" if s.method == "ekfac" else "") + f"{fs.fisher}_{fs.kfac}"
        key = ScoreKey("kfac", m.name, curvature=name, damping=damping, compression=s.compression)
        scores, timings = attribute(
            self.model,
            self.params,
            self.train_images,
            queries,
            {m.name: m},
            {name: K},
            [key],
            train_measurement=self.measurement("loss"),
            train_draws=s.train_draws,
            query_draws=s.query_draws,
            seed=s.seed,
            query_trajectories=trajectories,
            batch_size=s.batch_size,
            progress=progress,
        )
        meta = {"mean_eigenvalue": scale, "timings": vars(timings)}
        return Attribution(scores[key], m.name, s, key, meta)

    def _baseline(self, queries, m, s, trajectories, progress) -> Attribution:
        if s.method == "pixel":  # no model, so no gradients: baseline_scores' pixel kernel alone
            matrix = pixel_similarity(queries, self.train_images)
            return Attribution(matrix, "none", s, ScoreKey("pixel", "none"))
        measurements = {"loss": self.measurement("loss"), "square_norm": SquareNorm(self.schedule)}
        measurements[OUTPUT_MEAN] = OutputMean(self.schedule)
        measurements[m.name] = m
        num_params = sum(p.numel() for p in self.params)
        found = baseline_scores(
            self.model,
            self.params,
            self.train_images,
            queries,
            measurements,
            Projector(num_params, s.projection_dim, seed=s.seed),
            [s.damping],
            query_measurements=[m.name],
            train_draws=s.train_draws,
            query_draws=s.query_draws,
            seed=s.seed,
            precisions=("float32",),
            das=s.method == "das",
            query_trajectories=trajectories,
            batch_size=s.batch_size,
            progress=progress,
        )
        target = {"d-trak": "square_norm", "das": OUTPUT_MEAN}.get(s.method, m.name)
        (key,) = [
            k
            for k in found
            if k.method == s.method and k.measurement == target and k.precision == "float32"
        ]
        return Attribution(found[key], target, s, key, dict(found.meta))

    def __repr__(self) -> str:
        n = len(self.train_images)
        p = sum(q.numel() for q in self.params)
        return f"Attributor({type(self.model).__name__}, N={n}, P={p}, fit={self.fit_settings})"


__all__ = [
    "Attribution",
    "Attributor",
    "DiffusersEps",
    "FitSettings",
    "METHODS",
    "ScoreSettings",
    "schedule_from_betas",
]
