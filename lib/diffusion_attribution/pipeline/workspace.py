"""The pipeline's files under one root, with typed access to what the stages share.

A stage (:mod:`diffusion_attribution.pipeline.stages`) reads the outputs of earlier stages and writes
its own through a :class:`Workspace`, never through paths of its own: the training set, the
trained model, the generated samples, the fitted curvatures, the score matrices, the ground
truth and the LDS table each have one loader here. Loaded objects are cached per workspace.

Layout (relative to ``root``): ``outputs/<stage>/`` data, ``reports/figures/`` PNGs,
``metrics/<stage>.json`` metrics, ``.cache/`` resumable state and results set aside
(``.cache/stale/<stage>/``: never deleted, never tracked by DVC or git).

Execution settings are not parameters (moving to a GPU or a cluster must not invalidate
results): the torch device and thread count come from ``DA_DEVICE`` (default ``cpu``) and
``DA_THREADS`` (default: all cores).
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_attribution.attribution.scores import ScoreSet
from diffusion_attribution.core.config import Config, DiffusionConfig
from diffusion_attribution.diffusion.datasets import ImageDataset, pixel_levels
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import Measurement, SquareNorm
from diffusion_attribution.diffusion.training import load_checked_model


def execution_settings() -> dict[str, object]:
    """Device and thread count from the environment (see the module docstring)."""
    return {
        "device": os.environ.get("DA_DEVICE", "cpu"),
        "threads": int(os.environ.get("DA_THREADS", "0")) or os.cpu_count() or 1,
    }


def schedule_of(diffusion: DiffusionConfig) -> NoiseSchedule:
    """The linear noise schedule of ``diffusion`` (Ho et al. 2020)."""
    return NoiseSchedule.linear(diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end)


def measurements_of(
    schedule: NoiseSchedule, variance: str, levels: int, timesteps: tuple[int, ...]
) -> dict[str, Measurement]:
    """Every measurement attributed (Sec. 3.3): the ground truth's
    (:func:`~diffusion_attribution.evaluation.ground_truth.ground_truth_measurements`: the loss l, the
    ELBO, the sampling-trajectory log-probability, l_t at each of ``timesteps``) and D-TRAK's
    square norm, in that order with the square norm before the l_t."""
    from diffusion_attribution.evaluation.ground_truth import ground_truth_measurements

    measured = ground_truth_measurements(schedule, variance, levels, timesteps)
    first = {k: v for k, v in measured.items() if not k.startswith("l_t=")}
    rest = {k: v for k, v in measured.items() if k.startswith("l_t=")}
    return {**first, "square_norm": SquareNorm(schedule), **rest}


def write_json(path: str | Path, obj: object) -> None:
    """JSON written atomically (:func:`~diffusion_attribution.core.io.atomic_write_text`)."""
    from diffusion_attribution.core.io import atomic_write_text

    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


class Workspace:
    """Files of one pipeline run under ``root`` (module docstring)."""

    TRAIN_SET = "outputs/data/train.pt"
    MODEL = "outputs/train/model.pt"
    SAMPLES = "outputs/sample/samples.pt"
    CURVATURE = "outputs/curvature/{variant}.pt"
    INFLUENCE_SCORES = "outputs/influence/scores.pt"
    BASELINE_SCORES = "outputs/baselines/scores.pt"
    SUBSETS = "outputs/retrain/subsets.pt"
    GROUND_TRUTH = "outputs/measure/measurements.pt"
    LDS_TABLE = "outputs/evaluate/lds.csv"

    def __init__(
        self, root: str | Path = ".", device: str | None = None, threads: int | None = None
    ):
        settings = execution_settings()
        self.root = Path(root).resolve()
        self.device = device or str(settings["device"])
        self.threads = threads or int(settings["threads"])

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r}, device={self.device!r}, threads={self.threads})"

    def path(self, relative: str | Path) -> Path:
        """``root / relative``, to read."""
        return self.root / relative

    def out(self, relative: str | Path) -> Path:
        """``root / relative``, to write: its parent folder created."""
        p = self.root / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def folder(self, relative: str | Path) -> Path:
        """``root / relative`` as a folder, created."""
        p = self.root / relative
        p.mkdir(parents=True, exist_ok=True)
        return p

    def stale_dir(self, stage: str) -> Path:
        """Where ``stage`` moves results that no longer match its settings or code."""
        return self.root / ".cache" / "stale" / stage

    # ---- what the stages share ----------------------------------------------------------

    @cached_property
    def dataset(self) -> ImageDataset:
        """The training set written by the ``data`` stage."""
        return ImageDataset.load(self.path(self.TRAIN_SET))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.dataset.images.shape[1:])

    @property
    def pixel_levels(self) -> int:
        """Pixel levels of the data (the ELBO's discretised decoder)."""
        return pixel_levels(self.dataset.name)

    def measurements(self, diffusion: DiffusionConfig, timesteps: tuple[int, ...]) -> dict:
        """Every measurement attributed (:func:`measurements_of`) for this run's data."""
        return measurements_of(
            schedule_of(diffusion), diffusion.variance, self.pixel_levels, timesteps
        )

    @cached_property
    def model(self) -> nn.Module:
        """The full model's EMA weights (``train`` stage), in eval mode on the device."""
        return load_checked_model(self.path(self.MODEL), device=self.device)

    @cached_property
    def samples(self) -> dict[str, Tensor]:
        """The ``sample`` stage's output: ``images`` (quantised), ``x0``, ``trajectory``, ..."""
        return torch.load(self.path(self.SAMPLES), weights_only=True)

    def curvature(self, variant: str):
        """The K-FAC fitted by the ``curvature`` stage for ``variant``, on :attr:`device`
        (factors and eigenbases in float64 there, so preconditioning moves only the
        right-hand sides)."""
        from diffusion_attribution.curvature.kfac import KFAC

        return KFAC.load(self.path(self.CURVATURE.format(variant=variant))).to(self.device)

    @cached_property
    def scores(self) -> ScoreSet:
        """Every score matrix: K-FAC influence (``influence``) and the baselines
        (``baselines``), with the baselines' metadata (mean eigenvalues)."""
        return ScoreSet.load(self.path(self.INFLUENCE_SCORES)) | ScoreSet.load(
            self.path(self.BASELINE_SCORES)
        )

    @cached_property
    def subsets(self) -> dict:
        """The ``retrain`` stage's masks (M, N) and model file names."""
        return torch.load(self.path(self.SUBSETS), weights_only=True)

    @cached_property
    def ground_truth(self) -> dict:
        """The ``measure`` stage's output: ``subsets`` {name: (Q, M, K)}, ``reference``
        {name: (Q, K)}, ``full`` {name: (Q,)}, ``num_draws``, ``masks`` (M, N)."""
        return torch.load(self.path(self.GROUND_TRUTH), weights_only=True)

    @cached_property
    def lds_table(self):
        """The ``evaluate`` stage's LDS of every (score matrix, target) pair."""
        import pandas as pd

        return pd.read_csv(self.path(self.LDS_TABLE))

    # ---- writing ----------------------------------------------------------------------

    def write_metrics(self, stage: str, metrics: dict) -> Path:
        """``metrics/<stage>.json``, atomically."""
        path = self.out(f"metrics/{stage}.json")
        write_json(path, metrics)
        return path

    def save_figure(self, fig, name: str) -> Path:
        """``reports/figures/<name>`` (PNG, 150 dpi)."""
        from diffusion_attribution.pipeline.figures import save_figure

        return save_figure(fig, name, root=self.root)

    def set_threads(self) -> None:
        torch.set_num_threads(self.threads)


def notebook_context(params: dict | None, root: str | Path = ".") -> tuple[Config, Workspace]:
    """What a stage notebook starts with: the validated config -- ``params`` as papermill
    passed it from ``params.yaml``, or, when the notebook is run by hand (``params`` is
    ``None``), ``params.yaml`` itself read through the schema -- and the workspace."""
    from diffusion_attribution.core.config import load_config, parse_config

    config = load_config(Path(root) / "params.yaml") if params is None else parse_config(params)
    ws = Workspace(root)
    ws.set_threads()
    return config, ws
