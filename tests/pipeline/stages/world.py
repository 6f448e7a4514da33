"""Hand-made scores and ground truth for the analysis stages.

`evaluate.evaluate` and `observations.observations` take score matrices and measurements and
return every number, table and claim their notebooks show; here the truth is known by
construction: the measured change of each target is the sum of "true" scores over the removed
examples plus seed noise, K-FAC's scores are the true ones (plus a little noise), TRAK's are
noise at small damping and partly true at large damping, and so on.
"""

import torch

from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet
from diffusion_attribution.evaluation.lds import subset_masks

N, Q, M, K = 40, 12, 16, 3
VARIANTS = ("mc_expand", "mc_reduce", "empirical_expand", "empirical_reduce")
TIMESTEPS = (10, 100)
TARGETS = ("loss", "elbo", "trajectory", "l_t=10", "l_t=100")


def make_world():
    g = torch.Generator().manual_seed(0)
    true = {t: torch.randn(Q, N, generator=g) for t in TARGETS}
    masks = subset_masks(N, M, 0.5, seed=1)
    removed = (~masks).double()

    def measure(s, noise):
        change = (s.double() @ removed.T)[:, :, None]  # (Q, M, 1)
        return change + noise * torch.randn(Q, M, K, generator=g, dtype=torch.float64)

    # likelihoods move opposite to loss-like scores (proxy_sign); keep their "true" scores
    # the likelihood's own, so the correct measurement predicts it with a plus sign
    measured = {t: measure(true[t], 0.5) for t in TARGETS}
    reference = {t: torch.zeros(Q, K, dtype=torch.float64) for t in TARGETS}

    def noisy(s, level):
        return (s + level * torch.randn(Q, N, generator=g)).float()

    scores = {}
    quality = {"mc_expand": 0.1, "mc_reduce": 1.0, "empirical_expand": 0.5, "empirical_reduce": 6.0}
    for v, level in quality.items():
        for m in ("loss", "elbo"):
            scores[ScoreKey("kfac", m, v, 1e-8, "int8")] = noisy(true[m], level)
    for m in ("trajectory", "l_t=10", "l_t=100"):
        scores[ScoreKey("kfac", m, "mc_expand", 1e-8, "int8")] = noisy(true[m], 0.1)
    for d in (1e-6, 1e-4):
        for m in ("loss", "elbo"):
            scores[ScoreKey("kfac", m, "mc_expand", d, "int8")] = noisy(true[m], 0.1)
    eig = {"trak": 2.0, "d-trak": 4.0}
    for method, m in (
        ("trak", "loss"),
        ("trak", "elbo"),
        ("trak", "trajectory"),
        ("d-trak", "square_norm"),
    ):
        base = true["loss"] if m == "square_norm" else true[m]
        for rel, level in ((1e-3, 50.0), (1.0, 1.0), (10.0, 2.0)):
            for p in ("float32", "float16"):
                key = ScoreKey(method, m, "projected_empirical", rel * eig[method], precision=p)
                scores[key] = noisy(base, level)
    for method in ("grad_dot", "grad_cos"):
        for m in ("loss", "elbo", "trajectory"):
            scores[ScoreKey(method, m)] = noisy(true[m], 5.0)
    scores[ScoreKey("pixel", "none")] = noisy(true["loss"], 4.0)
    return ScoreSet(scores, {"mean_eigenvalue": eig}), measured, reference, masks
