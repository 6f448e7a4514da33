"""The pipeline's files under one root: where each stage reads and writes.

A stage (:mod:`diffusion_attribution.pipeline.stages`) finds the outputs of earlier stages and
places its own through a :class:`Workspace`, never through paths of its own. The workspace
holds paths only; each output is loaded by the type that defines it
(:meth:`~diffusion_attribution.diffusion.datasets.ImageDataset.load`,
:func:`~diffusion_attribution.diffusion.training.load_checked_model`,
:meth:`~diffusion_attribution.curvature.kfac.KFAC.load`,
:meth:`~diffusion_attribution.attribution.scores.ScoreSet.load`; the samples, subsets and ground
truth are dicts of tensors for ``torch.load(..., weights_only=True)``), so a stage depends only
on the code of what it reads.

Layout (relative to ``root``): ``outputs/<stage>/`` data, ``reports/figures/`` PNGs,
``metrics/<stage>.json`` metrics, ``.cache/`` resumable state and results set aside
(``.cache/stale/<stage>/``: never deleted, never tracked by DVC or git).

Execution settings are not parameters (moving to a GPU or a cluster must not invalidate
results): the torch device and thread count come from ``DA_DEVICE`` (default ``cpu``) and
``DA_THREADS`` (default: all cores).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from diffusion_attribution.core.config import Config, load_config, parse_config
from diffusion_attribution.core.io import atomic_write_bytes, atomic_write_text


def execution_settings() -> dict[str, object]:
    """Device and thread count from the environment (see the module docstring)."""
    return {
        "device": os.environ.get("DA_DEVICE", "cpu"),
        "threads": int(os.environ.get("DA_THREADS", "0")) or os.cpu_count() or 1,
    }


def write_json(path: str | Path, obj: object) -> None:
    """JSON written atomically (:func:`~diffusion_attribution.core.io.atomic_write_text`)."""
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


class Workspace:
    """Files of one pipeline run under ``root`` (module docstring)."""

    TRAIN_SET = "outputs/data/train.pt"
    MODEL = "outputs/train/model.pt"
    #: LoRA fine-tuning only (``finetune`` set): the base model's training set, the base
    #: model, and the adapter model whose LoRA weights are attributed (``MODEL`` is it merged).
    BASE_SET = "outputs/data/base.pt"
    BASE_MODEL = "outputs/train/base.pt"
    LORA_MODEL = "outputs/train/lora.pt"
    SAMPLES = "outputs/sample/samples.pt"
    CURVATURE = "outputs/curvature/{variant}.pt"
    INFLUENCE_SCORES = "outputs/influence/scores.pt"
    BASELINE_SCORES = "outputs/baselines/scores.pt"
    SUBSETS = "outputs/retrain/subsets.pt"
    GROUND_TRUTH = "outputs/measure/measurements.pt"
    LDS_TABLE = "outputs/evaluate/lds.csv"
    FIGURES = "reports/figures"

    def __init__(
        self, root: str | Path = ".", device: str | None = None, threads: int | None = None
    ):
        settings = execution_settings()
        self.root = Path(root).resolve()
        self.device = device or str(settings["device"])
        self.threads = threads or int(settings["threads"])

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r}, device={self.device!r}, threads={self.threads})"

    def lora_model(self) -> Path | None:
        """The adapter model (``LORA_MODEL``) when the ``train`` stage fine-tuned with LoRA, else
        ``None``: what :func:`~diffusion_attribution.diffusion.lora.load_attributed` takes."""
        path = self.path(self.LORA_MODEL)
        return path if path.exists() else None

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

    def write_metrics(self, stage: str, metrics: dict) -> Path:
        """``metrics/<stage>.json``, atomically."""
        path = self.out(f"metrics/{stage}.json")
        write_json(path, metrics)
        return path

    def read_metrics(self, stage: str) -> dict | None:
        """``metrics/<stage>.json`` as written by :meth:`write_metrics`, or ``None`` when that
        stage has written none."""
        path = self.path(f"metrics/{stage}.json")
        return json.loads(path.read_text()) if path.is_file() else None

    def save_figure(self, fig, name: str) -> Path:
        """Save the matplotlib figure ``fig`` as ``reports/figures/<name>`` (PNG, 150 dpi,
        written atomically: never a half-written PNG) and return the path."""
        path = self.path(self.FIGURES) / name
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
        atomic_write_bytes(buffer.getvalue(), path)
        return path

    def set_threads(self) -> None:
        torch.set_num_threads(self.threads)


def notebook_context(params: dict | None, root: str | Path = ".") -> tuple[Config, Workspace]:
    """What a stage notebook starts with: the validated config -- ``params`` as papermill
    passed it from ``params.yaml``, or, when the notebook is run by hand (``params`` is
    ``None``), ``params.yaml`` itself read through the schema -- and the workspace."""
    config = load_config(Path(root) / "params.yaml") if params is None else parse_config(params)
    ws = Workspace(root)
    ws.set_threads()
    return config, ws
