"""DAS, the Diffusion Attribution Score (Lin et al., ICLR 2025), in this harness's score format.

What DAS attributes
-------------------
DAS attributes the change of the model's *output* rather than of a loss. Removing x_j moves the
predicted noise eps_theta(x_t, t) of a generated sample, and DAS measures that move: the KL
divergence between the two Gaussian reverse steps is proportional to
||eps_{theta_{-j}}(x_t, t) - eps_theta(x_t, t)||^2. Linearise the model in its parameters, so
that training is least squares on its outputs. Then one Newton step from theta removes x_j (the
leave-one-out step of least squares),

    theta_{-j} - theta ~ (Phi^T Phi)^{-1} phi_j r_j          (r_j: x_j's residual),

and the query's output moves by phi_q^T (theta_{-j} - theta). The authors reduce the output to
one number per (t, eps) by its mean (their code's ``loss_function_type="mean"``). With that
scalar output

    f(theta, x) = E_{t, eps} sum_pixels eps_theta(x_t, t)              (:class:`OutputMean`),

projected features phi = R^T grad f / sqrt(k) (training side scaled to fbar = f / D, the pixel
mean, as TRAK's are to lbar = l / D) and the per-example residual

    e_j = sqrt(l(theta, x_j) / D)                                     (:func:`residual_weights`),

the root mean square of x_j's noise-prediction error at the training draws, DAS's score is

    score[q, j] = (1 / N) phi_q^T (Phi^T Phi / N + lambda I)^{-1} phi_j * e_j.

This is the authors' ``DAS1``: TRAK's kernel on output gradients (:func:`~.trak.trak_scores`),
times the residual. The output mean is no loss, so which sign predicts a loss is a convention:
the scores are used as loss-like scores, as D-TRAK's square-norm scores are
(:func:`~diffusion_attribution.evaluation.lds.proxy_sign` lists ``output_mean`` with them,
fixed before any result), i.e. read in the library's convention "positive: removing x_j
raises the query's loss"; the authors' code, too, predicts a subset's loss from -scores for
DAS as for D-TRAK. The damping lambda is chosen as TRAK's is: relative to the mean eigenvalue
of Phi^T Phi / N, best of the sweep (*) and held out.

Where this differs from the authors' code
-----------------------------------------
- Timesteps: t ~ U{1..T}, with the same pre-drawn (t, eps) as TRAK. Theirs are 10 fixed
  timesteps, each timestep's gradient normalised to unit length before the average.
- e_j: the RMS residual of the diffusion loss at the training draws. Theirs is built from
  per-timestep RMS errors at 1000 timesteps, normalised across t and then averaged.
- No leverage factor 1 / (1 - h_jj). Their ``DAS0`` takes h from the diagonal of the
  generated-by-training kernel, which is not the training example's leverage.
- Not squared. The KL is a square, but a squared score has lost the sign that a loss's LDS
  needs (their ``DAS1squ``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffusion_attribution.attribution.trak import trak_scores_sweep
from diffusion_attribution.diffusion.conditional import bound, class_groups
from diffusion_attribution.diffusion.ddpm import EpsModel, q_sample
from diffusion_attribution.diffusion.measurements import Measurement

__all__ = ["CURVATURE", "OUTPUT_MEAN", "OutputMean", "das_scores_sweep", "residual_weights"]

#: The curvature of DAS in a :class:`~diffusion_attribution.attribution.scores.ScoreKey`: the
#: Gauss-Newton matrix Phi^T Phi / N of the linearised outputs, in the projected space.
CURVATURE = "projected_output_ggn"

#: The name of DAS's output function (:class:`OutputMean`) in the measurement mappings.
OUTPUT_MEAN = "output_mean"


class OutputMean(Measurement):
    """f(theta, x) = E_{t ~ U{1..T}} E_eps sum_pixels eps_theta(x_t, t): DAS's scalar output
    (module docstring). Like D-TRAK's square norm, a function to differentiate, not a property
    of the sample's probability."""

    name = OUTPUT_MEAN

    def __call__(self, eps_model: EpsModel, x0: Tensor, draws: dict[str, Tensor]) -> Tensor:
        t, eps = draws["t"], draws["eps"]
        b, s = t.shape
        if eps.shape != (b, s, *x0.shape[1:]):
            raise ValueError(f"eps must have shape {(b, s, *x0.shape[1:])}, got {tuple(eps.shape)}")
        t_rows = t.reshape(b * s)
        xt = q_sample(self.schedule, x0.repeat_interleave(s, dim=0), t_rows, eps.flatten(0, 1))
        return eps_model(xt, t_rows).flatten(1).sum(1).reshape(b, s).mean(1)


@torch.no_grad()
def residual_weights(
    model: nn.Module,
    loss: Measurement,
    images: Tensor,
    *,
    draws: int,
    seed: int,
    batch_size: int = 64,
    labels: Tensor | None = None,
) -> Tensor:
    """e_j = sqrt(l(theta, x_j) / D) for every training image (N,) float64: the RMS
    noise-prediction error of the diffusion ``loss`` at the training draws (``draws`` per
    example with ``seed``, those of TRAK's training features). Forward passes only.
    ``labels`` (N,): the images' classes, for a class-conditional model."""
    device = next(model.parameters()).device
    out = torch.empty(len(images), dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        ids = torch.arange(start, start + len(x))
        d = loss.draw(x, ids, draws, seed)
        if labels is None:
            values = loss(model, x, d).double().cpu()
        else:
            values = torch.empty(len(x), dtype=torch.float64)
            for c, sub in class_groups(labels[start : start + len(x)]):
                with bound(model, c):
                    part = {k: v[sub] for k, v in d.items()}
                    values[sub] = loss(model, x[sub.to(device)], part).double().cpu()
        out[start : start + len(x)] = values
    if not bool((out >= 0).all()):
        raise ValueError("residual_weights: the loss must be a sum of squares (>= 0)")
    return (out / images[0].numel()).sqrt()


def das_scores_sweep(
    query_features: Tensor,
    train_features: Tensor,
    residuals: Tensor,
    dampings: Sequence[float],
    num_train: int | None = None,
) -> dict[float, Tensor]:
    """DAS's (Q, N) float32 scores for every damping (module docstring): TRAK's kernel of the
    output features (:func:`~.trak.trak_scores_sweep`, float32 features solved in float64) with
    column j multiplied by ``residuals[j]``."""
    n = len(train_features)
    if residuals.shape != (n,):
        raise ValueError(
            f"need one residual per training example: {tuple(residuals.shape)} != ({n},)"
        )
    kernel = trak_scores_sweep(query_features, train_features, dampings, num_train, "float32")
    e = residuals.to(device=train_features.device, dtype=torch.float64)
    return {d: (s.double() * e).float() for d, s in kernel.items()}
