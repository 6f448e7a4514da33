"""Stage ``sample``: generated samples with their full sampling trajectories (App. G.2).

Ancestral sampling (Ho et al. 2020, Alg. 2) from the full model, every noise draw from one
seed, recording x_t for every t and the means of p_theta(x_{t-1} | x_t). The samples are
saved as images would be (clamped to [-1, 1], rounded to the data's pixel levels, as the ELBO's
discretised decoder needs); the trajectory measurement uses the recorded trajectory itself.
"""

from __future__ import annotations

import time

import matplotlib.pyplot as plt
import torch
from sklearn.neighbors import KNeighborsClassifier

from diffusion_attribution.core.config import Config
from diffusion_attribution.core.io import atomic_save
from diffusion_attribution.diffusion.conditional import guided, load_conditional
from diffusion_attribution.diffusion.datasets import ImageDataset, pixel_levels
from diffusion_attribution.diffusion.ddpm import sample as ancestral_sample
from diffusion_attribution.diffusion.likelihood import quantize
from diffusion_attribution.diffusion.training import load_checked_model
from diffusion_attribution.pipeline.figures import show_images
from diffusion_attribution.pipeline.schedule import schedule_of
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace

NOTEBOOK = "03_sample.ipynb"
INPUTS = ("outputs/data", "outputs/train")
OUTS = ("outputs/sample",)
PERSIST: tuple[str, ...] = ()
FIGURES = ("samples_vs_real.png", "samples_nearest_neighbours.png")
METRICS = ("metrics/sample.json",)

#: Samples shown with their nearest training images.
NEIGHBOURS_SHOWN = 16


#: Rows of the distance matrix computed at once by :func:`nearest`.
DISTANCE_ROWS = 1024


def nearest(
    a: torch.Tensor, b: torch.Tensor, exclude_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 distance from each row of ``a`` to its nearest row of ``b``, and that row's index;
    with ``exclude_self`` (``a`` is ``b``) a row is not its own neighbour. Computed
    :data:`DISTANCE_ROWS` rows at a time: the whole (N, N) matrix of CIFAR-10 would take 10 GB."""
    dist, idx = [], []
    for start in range(0, len(a), DISTANCE_ROWS):
        d = torch.cdist(a[start : start + DISTANCE_ROWS], b)
        if exclude_self:
            rows = torch.arange(len(d))
            d[rows, rows + start] = float("inf")
        m = d.min(1)
        dist.append(m.values)
        idx.append(m.indices)
    return torch.cat(dist), torch.cat(idx)


def run(config: Config, ws: Workspace) -> StageResult:
    """Sample, save, and check that the samples look like the classes without copying."""
    ds = ImageDataset.load(ws.path(ws.TRAIN_SET))
    scfg = config.sample
    schedule = schedule_of(config.diffusion)
    start = time.perf_counter()
    eps_model, batch_size, labels = _sampler(scfg, config.conditional, ws, ds)
    res = ancestral_sample(
        eps_model,
        schedule,
        scfg.num_samples,
        tuple(ds.images.shape[1:]),
        seed=scfg.seed,
        variance=config.diffusion.variance,
        batch_size=batch_size,
        record_trajectory=True,
        progress=True,
        device=ws.device,
    )
    seconds = time.perf_counter() - start
    images = quantize(res.x0.clamp(-1, 1), pixel_levels(ds.name))
    atomic_save(
        {
            "images": images,
            "x0": res.x0,
            "trajectory": res.trajectory,
            "means": res.means,
            "variances": res.variances,
            "seed": scfg.seed,
            "variance": config.diffusion.variance,
            **(
                {}
                if labels is None
                else {"labels": labels, "guidance": config.conditional.guidance}
            ),
        },
        ws.out(ws.SAMPLES),
    )
    print(f"{scfg.num_samples} samples x {schedule.num_timesteps} steps in {seconds:.1f} s")

    generated = res.x0.clamp(-1, 1)
    flat_train = ds.images.flatten(1)
    nn_gen, nn_idx = nearest(generated.flatten(1), flat_train)
    nn_train, _ = nearest(flat_train, flat_train, exclude_self=True)
    knn = KNeighborsClassifier(n_neighbors=5).fit(flat_train.numpy(), ds.labels.numpy())
    predicted = torch.as_tensor(knn.predict(generated.flatten(1).numpy()))
    classes = ds.labels.unique().tolist()
    share_samples = {
        name: round(float((predicted == c).float().mean()), 3)
        for c, name in zip(classes, ds.class_names, strict=True)
    }
    share_train = {
        name: round(float((ds.labels == c).float().mean()), 3)
        for c, name in zip(classes, ds.class_names, strict=True)
    }
    metrics = {
        "num_samples": scfg.num_samples,
        "class_share_samples_knn": share_samples,
        "class_share_train": share_train,
        "seconds": round(seconds, 1),
        "median_nn_distance_samples": round(float(nn_gen.median()), 3),
        "median_nn_distance_train": round(float(nn_train.median()), 3),
        "fraction_outside_range": round(float((res.x0.abs() > 1.05).float().mean()), 4),
    }
    guided_note = ""
    if labels is not None:  # does a guided sample look like its class?
        metrics["knn_agrees_with_class"] = round(float((predicted == labels).float().mean()), 3)
        metrics["guidance"] = config.conditional.guidance
        guided_note = (
            f" The samples are class-conditional, sample i of the (i mod {len(classes)})-th class, drawn with "
            f"guidance weight {config.conditional.guidance:g}; the 5-NN classifier gives the class "
            f"the sample was generated for in {100 * metrics['knn_agrees_with_class']:.0f}% of them."
        )
    ws.write_metrics("sample", metrics)
    summary = (
        f"**This run.** {metrics['num_samples']} samples in {metrics['seconds']} s. Share of samples per class "
        f"(5-NN classifier on the training set): {share_samples}; share in the training set: {share_train}. Median L2 distance from a "
        f"sample to its nearest training image: {metrics['median_nn_distance_samples']}; from a training image to "
        f"its nearest other training image: {metrics['median_nn_distance_train']} (a much smaller value for the "
        f"samples would indicate copying). Fraction of pixels outside [-1.05, 1.05]: {metrics['fraction_outside_range']}."
        + guided_note
    )
    return StageResult(
        metrics=metrics,
        data={"generated": generated, "dataset": ds, "nearest": nn_idx, "seed": scfg.seed},
        summary=summary,
    )


def _sampler(scfg, cc, ws: Workspace, ds: ImageDataset):
    """The eps-model ancestral sampling uses, its batch size and the samples' classes: the full
    model, or for a class-conditional profile the guided model (eq. 6 of Ho & Salimans) with
    sample i of the training set's (i mod K)-th class (ascending), every sample in one batch
    (its rows carry their classes)."""
    if cc is None:
        model = load_checked_model(ws.path(ws.MODEL), device=ws.device)
        return model, scfg.batch_size, None
    model = load_conditional(ws.path(ws.MODEL), device=ws.device)
    classes = ds.labels.unique()
    labels = classes[torch.arange(scfg.num_samples) % len(classes)]
    return guided(model, labels, cc.guidance), None, labels


def fig_samples_vs_real(result: StageResult) -> plt.Figure:
    """Generated samples beside as many random training images."""
    generated, ds = result.data["generated"], result.data["dataset"]
    n = len(generated)
    g = torch.Generator().manual_seed(0)
    real = ds.images[torch.randperm(len(ds), generator=g)[:n]]
    nrow = max(1, int(n**0.5))
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.4))
    show_images(axes[0], generated, nrow, f"generated ({n})")
    show_images(axes[1], real, nrow, f"random training images ({ds.name})")
    return fig


def fig_nearest_neighbours(result: StageResult) -> plt.Figure:
    """The first samples (top row) and their nearest training images in pixel space."""
    generated, ds, nearest = (
        result.data["generated"],
        result.data["dataset"],
        result.data["nearest"],
    )
    k = min(NEIGHBOURS_SHOWN, len(generated))
    fig, ax = plt.subplots(figsize=(k * 0.8, 2.2))
    show_images(
        ax,
        torch.cat([generated[:k], ds.images[nearest[:k]]]),
        nrow=k,
        title="samples (top) and their nearest training images (bottom)",
    )
    return fig
