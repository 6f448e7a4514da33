"""Stage ``data``: the training set every later stage uses (App. G.1).

digits-2 / digits-10 (scikit-learn's bundled 8x8 digits, the CPU analogues of CIFAR-2 /
CIFAR-10) or CIFAR from the official binary archive tracked by ``data.dvc``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from diffusion_attribution.core.config import Config
from diffusion_attribution.diffusion.datasets import finetune_split, load_dataset
from diffusion_attribution.pipeline.figures import show_images
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace

NOTEBOOK = "01_data.ipynb"
INPUTS: tuple[str, ...] = ()
OUTS = ("outputs/data",)
PERSIST: tuple[str, ...] = ()
FIGURES = ("data_examples.png",)
METRICS: tuple[str, ...] = ()


def run(config: Config, ws: Workspace) -> StageResult:
    """Load the configured data set and save it to ``outputs/data/train.pt``; with LoRA
    fine-tuning (``finetune``), the fine-tuning set there and the base model's set beside it."""
    data, finetune = config.data, config.finetune
    # a relative archive path is relative to the workspace (the repository root), not the cwd
    archive = ws.path(data.cifar_archive)
    ds = load_dataset(
        data.dataset, **data.model_dump(exclude={"dataset", "cifar_archive"}), cifar_archive=archive
    )
    base_note = ""
    if finetune is not None:
        base, ds = finetune_split(
            ds, finetune.base_classes, finetune.classes, finetune.size, finetune.seed
        )
        base.save(ws.out(ws.BASE_SET))
        base_note = (
            f" It is the LoRA fine-tuning set; the base model is trained on the {len(base)} "
            f"images of classes {list(finetune.base_classes)}."
        )
        print(f"base model's set: {len(base)} images of classes {list(finetune.base_classes)}")
    if config.conditional is not None:  # class by class: the K-FAC fit binds one class per run
        ds = ds.subset(torch.argsort(ds.labels, stable=True))
        base_note = " Sorted by class, for the class-conditional model."
    ds.save(ws.out(ws.TRAIN_SET))
    counts = {
        name: int((ds.labels == label).sum())
        for label, name in zip(ds.labels.unique().tolist(), ds.class_names, strict=True)
    }
    shape = tuple(ds.images.shape[1:])
    summary = (
        f"**This run.** Training set `{ds.name}`: N = {len(ds)} images of shape "
        f"{shape}, pixel values in [{ds.images.min():.0f}, {ds.images.max():.0f}], "
        f"classes {counts}.{base_note}"
    )
    print(f"{ds.name}: {len(ds)} images of shape {shape}, per class: {counts}")
    return StageResult(data={"dataset": ds, "counts": counts}, summary=summary)


def fig_examples(result: StageResult, per_row: int = 8) -> plt.Figure:
    """Eight training images of each class, one class per row."""
    ds = result.data["dataset"]
    labels = ds.labels.unique().tolist()
    rows = torch.cat([ds.images[ds.labels == lab][:per_row] for lab in labels])
    fig, ax = plt.subplots(figsize=(per_row * 0.6 + 1, len(labels) * 0.6 + 0.6))
    show_images(ax, rows, nrow=per_row, title=f"{ds.name}: training images, one class per row")
    return fig
