"""What the pipeline attributes: the measurements (the ground truth's and D-TRAK's), the model
and its parameters, and the classes a class-conditional model takes."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from diffusion_attribution.core.sections import ConditionalConfig, FinetuneConfig
from diffusion_attribution.diffusion.conditional import (
    ConditionalUNet,
    is_conditional,
    load_conditional,
    num_classes,
)
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.lora import load_attributed
from diffusion_attribution.diffusion.measurements import Measurement, SquareNorm
from diffusion_attribution.diffusion.unet import kfac_parameters
from diffusion_attribution.evaluation.conditional_retraining import (
    conditional_spec,
    run_conditional_stack,
)
from diffusion_attribution.evaluation.ground_truth import ground_truth_measurements
from diffusion_attribution.evaluation.lora_retraining import lora_spec, run_lora_stack
from diffusion_attribution.evaluation.retraining import run_stack
from diffusion_attribution.pipeline.workspace import Workspace


def measurements_of(
    schedule: NoiseSchedule, variance: str, levels: int, timesteps: tuple[int, ...]
) -> dict[str, Measurement]:
    """Every measurement attributed (Sec. 3.3): the ground truth's
    (:func:`~diffusion_attribution.evaluation.ground_truth.ground_truth_measurements`: the loss l, the
    ELBO, the sampling-trajectory log-probability, l_t at each of ``timesteps``) and D-TRAK's
    square norm, in that order with the square norm before the l_t. ``levels``: the data's
    pixel levels (:func:`~diffusion_attribution.diffusion.datasets.pixel_levels`, the ELBO's
    discretised decoder)."""
    measured = ground_truth_measurements(schedule, variance, levels, timesteps)
    first = {k: v for k, v in measured.items() if not k.startswith("l_t=")}
    rest = {k: v for k, v in measured.items() if k.startswith("l_t=")}
    return {**first, "square_norm": SquareNorm(schedule), **rest}


def attributed_model(ws: Workspace) -> tuple[nn.Module, list[Tensor]]:
    """The model whose samples are attributed and the parameters attributed: a class-conditional
    U-Net (:mod:`~diffusion_attribution.diffusion.conditional`) with every Linear / Conv2d
    weight, else :func:`~diffusion_attribution.diffusion.lora.load_attributed` (the U-Net, or
    its LoRA weights alone when the workspace has a LoRA model)."""
    path = ws.path(ws.MODEL)
    if is_conditional(path):
        net = load_conditional(path, device=ws.device)
        return net, kfac_parameters(net)
    return load_attributed(path, ws.lora_model(), device=ws.device)


def class_labels(net: nn.Module, labels: Tensor | None) -> Tensor | None:
    """``labels`` when ``net`` is class-conditional (every gradient, curvature and measurement
    of an image is then taken given its class), else ``None``."""
    if not isinstance(net, ConditionalUNet):
        return None
    if labels is None:
        raise ValueError("a class-conditional model needs the classes of its images (labels)")
    return labels


def sample_labels(samples: dict, rows: slice | Tensor = slice(None)) -> Tensor | None:
    """The classes of the generated samples ``rows`` (the ``sample`` stage's file, loaded), or
    ``None`` for samples of an unconditional model."""
    labels = samples.get("labels")
    return None if labels is None else labels[rows]


def retraining_recipe(
    finetune: FinetuneConfig | None, cond: ConditionalConfig | None, ws: Workspace
) -> tuple[dict, Callable]:
    """How the profile's model is retrained on a subset: the keyword arguments of
    :func:`~diffusion_attribution.evaluation.retraining.make_job` (and ``subset_jobs``,
    ``reference_jobs``) and the runner :func:`~diffusion_attribution.evaluation.retraining.run_jobs`
    trains the jobs with: LoRA re-runs only the fine-tuning from the shared base, a
    class-conditional profile trains the conditional U-Net, else the stacked trainer
    (``finetune``, ``cond``: the sections ``finetune`` and ``conditional``)."""
    if finetune is not None:
        spec = lora_spec(ws.path(ws.BASE_MODEL), finetune.rank, finetune.alpha)
        return {"lora": spec}, run_lora_stack
    if cond is not None:
        k = num_classes(ImageDataset.load(ws.path(ws.TRAIN_SET)))
        spec = conditional_spec(k, cond.p_uncond)
        return {"conditional": spec}, run_conditional_stack
    return {}, run_stack
