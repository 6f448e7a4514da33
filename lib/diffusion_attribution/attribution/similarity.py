"""Similarity baselines: context for the attribution methods, not influence estimates.

:func:`pixel_similarity`, :func:`feature_cosine` (on the U-Net's own bottleneck features,
:func:`bottleneck_features`: nearest-neighbour attribution in a learned feature space, in the
spirit of model-free NDA baselines, with no downloaded encoder), :func:`gradient_dot` and
:func:`gradient_cosine` are *not* influence
estimates: they do not predict m(theta_{-j}, x_q) - m(theta, x_q) and have no units of m. They
are context ("does a method beat looking alike?"). They share the (Q, N) float32 format and
the direction of the score convention of :mod:`diffusion_attribution.attribution.influence` (larger = x_j
more "responsible" for x_q, which for the loss measurement means removing x_j should increase
the query's loss), but not its scale. :func:`gradient_dot` is the first-order score with the
identity in place of the Hessian.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "bottleneck_features",
    "feature_cosine",
    "gradient_cosine",
    "gradient_dot",
    "pixel_similarity",
]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).double()


def pixel_similarity(queries: Tensor, train: Tensor, bandwidth: float | None = None) -> Tensor:
    """exp(-||x_q - x_j||^2 / (2 h^2)) (Q, N) float32: a model-free "looks alike" baseline.

    ``bandwidth`` h defaults to the median of the Q x N query-train distances. Not an influence
    estimate (module docstring).
    """
    d2 = torch.cdist(_flat(queries), _flat(train)).pow(2)
    if bandwidth is None:
        h = float(d2.sqrt().median())
        if h == 0:
            raise ValueError("median query-train distance is 0; pass a bandwidth")
    else:
        h = float(bandwidth)
        if not h > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    return torch.exp(-d2 / (2 * h * h)).float()


def gradient_dot(query: Tensor, train: Tensor, num_train: int | None = None) -> Tensor:
    """(1/N) g_q^T g_j (Q, N) float32: eq. 6 with the identity in place of the Hessian.

    Works on raw gradients or on projected features (then approximately, by JL). Context only:
    the identity has the wrong scale to predict retraining (module docstring).
    """
    n = train.shape[0] if num_train is None else int(num_train)
    return (_flat(query) @ _flat(train).T / n).float()


def gradient_cosine(query: Tensor, train: Tensor, eps: float = 1e-30) -> Tensor:
    """cos(g_q, g_j) (Q, N) float32 in [-1, 1]. Context only (module docstring)."""
    q, t = _flat(query), _flat(train)
    q = q / q.norm(dim=1, keepdim=True).clamp(min=eps)
    t = t / t.norm(dim=1, keepdim=True).clamp(min=eps)
    return (q @ t.T).float()


@torch.no_grad()
def bottleneck_features(
    model: nn.Module,
    images: Tensor,
    *,
    module: str = "mid2",
    timestep: int = 1,
    batch_size: int = 256,
    labels: Tensor | None = None,
) -> Tensor:
    """(N, F) float32: the output of ``model``'s submodule ``module`` (the U-Net's bottleneck,
    ``mid2`` of :class:`~diffusion_attribution.diffusion.unet.UNet`), flattened, for the clean
    images (N, C, H, W) at ``timestep`` (1: the least noisy step the model was trained on).
    The model runs in eval mode (restored afterwards). ``labels`` (N,): the images' classes,
    given to a class-conditional model with each image."""
    target = dict(model.named_modules()).get(module)
    if target is None:
        raise ValueError(f"the model has no submodule {module!r}")
    captured: list[Tensor] = []
    handle = target.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device)
            t = torch.full((len(x),), timestep, dtype=torch.int64, device=device)
            if labels is None:
                model(x, t)
            else:
                model(x, t, labels[i : i + batch_size].to(device))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat([c.flatten(1) for c in captured]).float()


def feature_cosine(query_features: Tensor, train_features: Tensor) -> Tensor:
    """cos(f_q, f_j) (Q, N) float32 of two sets of feature vectors (:func:`bottleneck_features`).
    Context only (module docstring)."""
    return gradient_cosine(query_features, train_features)
