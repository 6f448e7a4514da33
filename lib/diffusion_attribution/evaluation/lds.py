"""Linear Data-modelling Score (paper Sec. 4, eq. 13; Park et al., 2023) and removal sets.

For M random subsets D_i of the training set (each a fraction alpha of it, drawn without
replacement) and K training seeds, the LDS of an attribution method for a query x is

    spearman[ (a(D, D_i, x))_{i=1..M} ; (1/K sum_k m(theta_k(D_i), x))_{i=1..M} ]      (eq. 13)

where a(D, D_i, x) is the method's predicted measurement for the model trained on D_i. With
the library's score convention (``influence.py``: a score predicts the change of the
measurement when that example is removed), the predicted change for D_i is the sum of the
scores over the examples *not* in D_i; any additive constant (m(theta, x)) does not change a
rank correlation. The LDS reported is the mean over queries, with the standard error of that
mean over queries.

Proxies. A score matrix for one measurement can be evaluated against the measured change of
another (Fig. 2 "(m. loss)", Fig. 11). The sign is fixed by what the functions are, never by
looking at the result: loss-like scores (the loss, l_t, D-TRAK's square norm, pixel similarity)
predict a loss-like target as they are, and predict a likelihood (the ELBO, the trajectory
log-probability, both of the form -sum_t w_t l_t + const) with a minus sign
(:func:`proxy_sign`).

What exact retraining achieves. Two numbers, not to be confused:

* *Seed reproducibility* (:func:`seed_reproducibility`): exact retraining with one seed
  predicting the mean of the other K - 1 seeds. It is scored against a (K - 1)-seed mean while
  methods are scored against the K-seed mean, so it is *not* an upper bound for them (with
  K = 2 a method predicting the expectation well beats it: the target of the methods is less
  noisy than that of the reproducibility).
* *The LDS upper bound* (:func:`lds_upper_bound`): the correlation that a perfect predictor of
  the expectation over seeds, E_k[m(theta_k(D_i), x)], reaches against the observed K-seed
  mean. In classical test theory the observed mean is Y = T + e (T the expectation, e seed
  noise independent of T and of any method), and corr(X, Y) = corr(X, T) sqrt(rho_K) <=
  sqrt(rho_K) for every predictor X that does not know the noise, where rho_K = var T / var Y
  is the reliability of the K-seed mean. rho_K comes from the average correlation r between
  two single seeds by the Spearman-Brown formula, rho_K = K r / (1 + (K - 1) r). All seed
  pairs are averaged, rather than split into two halves, so that every seed counts equally for
  any K (with K = 3 halves would be unequal). Ranks instead of values make this an
  approximation (Spearman correlations of ranks of Gaussian variables are close to their
  Pearson values); a synthetic test checks it where the expectation is known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor


def subset_masks(num_train: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """(M, N) bool: row i marks the examples kept in subset D_i, exactly round(fraction * N)
    of them, drawn without replacement from a generator seeded with ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if num_subsets < 2:
        raise ValueError(f"need at least 2 subsets for a rank correlation, got {num_subsets}")
    keep = round(fraction * num_train)
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_subsets, num_train, dtype=torch.bool)
    for i in range(num_subsets):
        masks[i, torch.randperm(num_train, generator=g)[:keep]] = True
    return masks


def predicted_changes(scores: Tensor, masks: Tensor) -> Tensor:
    """(Q, M) predicted m(theta_{D_i}) - m(theta): the sum of each query's scores (Q, N) over
    the examples removed from subset i (``masks`` (M, N), True = kept)."""
    if scores.shape[1] != masks.shape[1]:
        raise ValueError(f"scores cover {scores.shape[1]} examples, masks {masks.shape[1]}")
    return scores.double() @ (~masks).double().T


@dataclass(frozen=True)
class LDSResult:
    """Mean over queries of the per-query Spearman correlation, its standard error, and the
    per-query values (NaN where a query's measurements or predictions are constant)."""

    mean: float
    stderr: float
    per_query: Tensor

    def __str__(self) -> str:
        return f"{self.mean:.3f} +- {self.stderr:.3f}"


def _summarise(per_query: np.ndarray) -> LDSResult:
    finite = per_query[np.isfinite(per_query)]
    if finite.size == 0:
        return LDSResult(float("nan"), float("nan"), torch.as_tensor(per_query))
    stderr = float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else float("nan")
    return LDSResult(float(finite.mean()), stderr, torch.as_tensor(per_query))


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.full(a.shape[0], np.nan)
    for q in range(a.shape[0]):
        if np.ptp(a[q]) > 0 and np.ptp(b[q]) > 0:
            out[q] = spearmanr(a[q], b[q]).statistic
    return out


def lds(predicted: Tensor, measured: Tensor) -> LDSResult:
    """Eq. 13. ``predicted`` (Q, M); ``measured`` (Q, M, K) measurements of every query on the
    model of every subset and seed (or (Q, M) already averaged over seeds)."""
    target = measured.double().mean(-1) if measured.ndim == 3 else measured.double()
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} vs measured {tuple(target.shape)}")
    return _summarise(_spearman_rows(predicted.double().numpy(), target.numpy()))


#: :func:`lds` under its full name, as the package exports it (``diffusion_attribution.evaluation.lds``
#: is this module).
linear_datamodelling_score = lds


def retraining_proxy(proxy: Tensor, target: Tensor) -> LDSResult:
    """LDS of exact retraining used as the attribution: for each seed k, the Spearman
    correlation over subsets between the *proxy* measurement of seed k's model and the mean of
    the *target* measurement over the other seeds, averaged over k. ``proxy`` and ``target``
    are (Q, M, K), K >= 2. With proxy = target this is the retraining ceiling; with l_t' for
    l_t it is Fig. 12 (retraining in place of the influence approximation)."""
    if proxy.ndim != 3 or proxy.shape[2] < 2 or proxy.shape != target.shape:
        raise ValueError(
            f"proxy and target must both be (Q, M, K) with K >= 2, got {tuple(proxy.shape)} "
            f"and {tuple(target.shape)}"
        )
    p, m = proxy.double().numpy(), target.double().numpy()
    per_seed = []
    for s in range(m.shape[2]):
        others = np.delete(m, s, axis=2).mean(2)
        per_seed.append(_spearman_rows(p[:, :, s], others))
    return _summarise(np.nanmean(np.stack(per_seed), axis=0))


def seed_reproducibility(measured: Tensor) -> LDSResult:
    """Exact retraining as the attribution: for each seed k, the Spearman correlation between
    the measurements of seed k and the mean of the other seeds, averaged over k; ``measured``
    (Q, M, K) with K >= 2. Not an upper bound for methods scored against the K-seed mean
    (module docstring; :func:`lds_upper_bound` is)."""
    if measured.ndim != 3 or measured.shape[2] < 2:
        raise ValueError(f"measured must be (Q, M, K) with K >= 2, got {tuple(measured.shape)}")
    return retraining_proxy(measured, measured)


def spearman_brown(r: Tensor | float, k: int) -> Tensor:
    """Reliability of the mean of ``k`` parallel measurements whose pairwise correlation is
    ``r``: k r / (1 + (k - 1) r) (negative r are clipped to 0)."""
    r = torch.as_tensor(r, dtype=torch.float64).clamp(min=0.0)
    return k * r / (1 + (k - 1) * r)


def seed_pair_correlation(measured: Tensor) -> np.ndarray:
    """(Q,): per query, the mean over seed pairs j < k of the Spearman correlation over subsets
    between seed j's and seed k's measurements; ``measured`` (Q, M, K), K >= 2."""
    if measured.ndim != 3 or measured.shape[2] < 2:
        raise ValueError(f"measured must be (Q, M, K) with K >= 2, got {tuple(measured.shape)}")
    m = measured.double().numpy()
    K = m.shape[2]
    pairs = [_spearman_rows(m[:, :, j], m[:, :, k]) for j in range(K) for k in range(j + 1, K)]
    return np.nanmean(np.stack(pairs), axis=0)


def lds_upper_bound(measured: Tensor) -> LDSResult:
    """Upper bound on the LDS of any method scored against the K-seed mean (eq. 13):
    sqrt(rho_K), with rho_K the Spearman-Brown reliability of the K-seed mean computed from
    the seed-pair correlation averaged over queries (module docstring). ``measured`` (Q, M, K),
    K >= 2.

    The correlation is pooled over queries before the (concave) square root: one query's
    estimate from M subsets is too noisy to take a root of without a large downward bias, and
    by Jensen's inequality the pooled value is at least the mean of the per-query bounds, so
    it stays an upper bound. The standard error is the jackknife's over queries; ``per_query``
    holds the jackknife pseudo-values, whose mean (``mean``) is the bias-corrected estimate."""
    r = seed_pair_correlation(measured)
    r = r[np.isfinite(r)]
    K = measured.shape[2]

    def bound(values: np.ndarray) -> float:
        return math.sqrt(float(spearman_brown(float(values.mean()), K)))

    n = r.size
    if n < 2:
        return LDSResult(bound(r) if n else float("nan"), float("nan"), torch.as_tensor(r))
    full = bound(r)
    loo = np.array([bound(np.delete(r, i)) for i in range(n)])
    return _summarise(n * full - (n - 1) * loo)


def ceiling_per_sample(measured: Tensor) -> np.ndarray:
    """(Q,) the approximate ceiling of each sample on its own, sqrt(rho_K) from that sample's
    seed-pair correlation over its M subsets (NaN where it is undefined). Far noisier than the
    pooled :func:`lds_upper_bound`, and by Jensen's inequality lower on average: a spread
    to read, not a bound to hold each sample's LDS to."""
    r = torch.as_tensor(seed_pair_correlation(measured))
    return torch.sqrt(spearman_brown(r, measured.shape[2])).numpy()


def ceiling_exceedance(measured: Tensor, runs: int = 200, seed: int = 0) -> dict[str, float]:
    """How far a realised LDS can exceed :func:`lds_upper_bound` by chance, on synthetic data
    of ``measured``'s shape (Q, M, K) and pooled seed-pair correlation r.

    The ceiling is a population bound for a Pearson correlation (module docstring), applied to
    Spearman correlations and estimated from the same finite grid; this measures what that
    costs. Each of ``runs`` synthetic runs draws the expectation T (Q, M) i.i.d. N(0, 1) and K
    seeds Y_k = T + e_k with e_k ~ N(0, (1 - rho) / rho), rho = 2 sin(pi r / 6) the Pearson
    correlation whose Spearman value is r for Gaussians; the perfect predictor X = T is scored
    with :func:`lds` against the K-seed mean and compared with the ceiling :func:`lds_upper_bound`
    estimated from the same Y. Returns the means of the realised LDS and of the estimated
    ceiling, the 95th percentile and the maximum over runs of (realised - ceiling), the
    fraction of runs in which the realised LDS exceeds the ceiling, and the fraction of (run,
    sample) pairs whose per-sample LDS exceeds the sample's own ceiling
    (:func:`ceiling_per_sample`)."""
    Q, M, K = measured.shape
    r = float(np.nanmean(seed_pair_correlation(measured)))
    rho = min(max(2 * math.sin(math.pi * r / 6), 1e-3), 1 - 1e-9)
    g = torch.Generator().manual_seed(seed)
    realised, ceiling, above = [], [], []
    for _ in range(runs):
        T = torch.randn(Q, M, 1, generator=g, dtype=torch.float64)
        Y = T + math.sqrt((1 - rho) / rho) * torch.randn(Q, M, K, generator=g, dtype=torch.float64)
        res = lds(T[..., 0], Y)
        realised.append(res.mean)
        ceiling.append(lds_upper_bound(Y).mean)
        per = ceiling_per_sample(Y)
        ok = np.isfinite(per) & np.isfinite(res.per_query.numpy())
        above.append(float((res.per_query.numpy()[ok] > per[ok]).mean()))
    excess = np.array(realised) - np.array(ceiling)
    return {
        "seed_pair_correlation": r,
        "realised": float(np.mean(realised)),
        "ceiling": float(np.mean(ceiling)),
        "excess_p95": float(np.percentile(excess, 95)),
        "excess_max": float(excess.max()),
        "fraction_runs_above": float((excess > 0).mean()),
        "fraction_samples_above_own": float(np.mean(above)),
        "runs": runs,
    }


def top_removal_sets(scores: Tensor, fraction: float) -> Tensor:
    """(Q, n_remove) training ids with the largest scores for each query: the examples whose
    removal is predicted to increase the measurement most (App. G.6), n_remove =
    ceil(fraction * N)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_remove = math.ceil(fraction * scores.shape[1])
    return scores.argsort(dim=1, descending=True)[:, :n_remove]


def same_class_share(
    scores: Tensor, query_classes: Tensor, train_labels: Tensor, fraction: float
) -> Tensor:
    """(Q,) float64: the share of each query's top ``fraction`` of the training set (its
    :func:`top_removal_sets`) whose class is the query's ``query_classes`` entry. Chance is
    the share of the training set in that class (:func:`class_share`)."""
    top = top_removal_sets(scores, fraction)
    return (train_labels[top] == query_classes[:, None].to(train_labels)).double().mean(1)


def class_share(query_classes: Tensor, train_labels: Tensor) -> Tensor:
    """(Q,) float64: the share of the training set in each query's class (the chance level of
    :func:`same_class_share`)."""
    return (train_labels[None, :] == query_classes[:, None].to(train_labels)).double().mean(1)


def retraining_scores(masks: Tensor, measured: Tensor) -> Tensor:
    """(Q, N) float64 attribution by exact retraining, read off the LDS subsets: for each
    training example j, the mean measurement of the subset models trained without j minus that
    of those trained with it (the difference-in-means estimate of a linear datamodel; positive:
    removing j increases the measurement, the sign of the influence scores). ``masks`` (M, N)
    (True = kept), ``measured`` (Q, M) (e.g. averaged over seeds). An example in every subset
    or in none scores 0. Noisy at a few dozen subsets: each example is in about half."""
    kept = masks.double()
    y = measured.double()
    n_in, n_out = kept.sum(0), (1 - kept).sum(0)
    mean_in, mean_out = y @ kept / n_in, y @ (1 - kept) / n_out
    return torch.nan_to_num(mean_out - mean_in, nan=0.0, posinf=0.0, neginf=0.0)


def random_removal_sets(num_train: int, fraction: float, num_queries: int, seed: int) -> Tensor:
    """(Q, n_remove) random training ids per query, n_remove = ceil(fraction * N): the
    control for :func:`top_removal_sets` (removing *some* data also changes the loss)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_remove = math.ceil(fraction * num_train)
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randperm(num_train, generator=g)[:n_remove] for _ in range(num_queries)]
    )


LOSS_LIKE = ("loss", "square_norm", "output_mean", "journey", "none")
LIKELIHOODS = ("elbo", "trajectory")


def proxy_sign(score_measurement: str, target: str) -> int | None:
    """+1 or -1: the sign with which scores computed for ``score_measurement`` predict the change
    of ``target``; ``None`` for pairs not evaluated.

    Same measurement: +1. l_t' for l_t (Fig. 11): +1. Loss-like scores ("loss", D-TRAK's
    "square_norm", DAS's "output_mean", Journey-TRAK's "journey", the similarity baselines'
    "none") for the loss: +1; for a likelihood (ELBO,
    trajectory log-probability), whose per-timestep terms are *minus* weighted l_t, -1
    (Fig. 2b "(m. loss)").
    """
    if score_measurement == target:
        return 1
    if score_measurement.startswith("l_t=") and target.startswith("l_t="):
        return 1
    if score_measurement in LOSS_LIKE:
        if target == "loss":
            return 1
        if target in LIKELIHOODS:
            return -1
    return None


def lds_table(
    scores: Mapping[object, Tensor], measured: Mapping[str, Tensor], masks: Tensor
) -> list[dict]:
    """LDS of every score matrix against every target it can predict (:func:`proxy_sign`).

    ``scores`` maps :class:`~diffusion_attribution.attribution.scores.ScoreKey` to (Q_s, N) with Q_s >=
    Q; ``measured`` maps target names to (Q, M, K); ``masks`` (M, N). Returns one dict per
    (key, target): the key's fields, ``target``, ``sign``, ``lds``, ``stderr`` and
    ``per_query`` (Q,) for protocols that split the queries or subsets.
    """
    rows = []
    for spec, s in scores.items():
        for target, m in measured.items():
            sign = proxy_sign(spec.measurement, target)
            if sign is None:
                continue
            pred = sign * predicted_changes(s[: m.shape[0]], masks)
            r = lds(pred, m)
            rows.append(
                {
                    **asdict(spec),
                    "target": target,
                    "sign": sign,
                    "lds": r.mean,
                    "stderr": r.stderr,
                    "per_query": r.per_query,
                }
            )
    return rows


def paired_difference(a: Tensor, b: Tensor) -> LDSResult:
    """Mean over queries of the per-query LDS difference a - b, with the standard error of
    that mean: the right error bar for "method A beats method B" on the same queries (much
    smaller than the two methods' own standard errors when their errors are correlated).
    Queries where either value is NaN are left out."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape:
        raise ValueError(f"per-query LDS of different shapes: {tuple(a.shape)} vs {tuple(b.shape)}")
    return _summarise((a - b).numpy())


@dataclass(frozen=True)
class HeldOutResult:
    """Damping chosen on held-out subsets (:func:`heldout_damping`)."""

    chosen: tuple[float, float]  # damping chosen on fold 0 (used on fold 1) and on fold 1
    heldout: LDSResult  # LDS with the damping chosen on the *other* fold, cross-fitted
    best_of_sweep: LDSResult  # LDS with each fold's own best damping (tuned on the test set)


def heldout_damping(
    scores: Mapping[float, Tensor], measured: Tensor, masks: Tensor
) -> HeldOutResult:
    """Choose the damping without looking at the subsets it is evaluated on.

    The M subsets are split into two folds (first and second half). On each fold, the damping
    with the highest LDS is chosen, and the LDS is evaluated on the *other* fold with that
    damping; the per-query LDS of the two evaluation folds is averaged (cross-fitting), so
    every subset is used for evaluation once and never for its own choice. ``best_of_sweep``
    is the same two-fold LDS with each fold's own best damping: the paper's protocol (App. D),
    optimistic because it tunes on the test set, computed on the same folds for a fair
    comparison. ``scores`` maps damping -> (Q_s, N) scores; ``measured`` (Q, M, K) or (Q, M).
    """
    if not scores:
        raise ValueError("no damping values to choose from")
    m = masks.shape[0]
    if m < 4:
        raise ValueError(f"need at least 4 subsets to split into two folds, got {m}")
    folds = (torch.arange(m) < m // 2, torch.arange(m) >= m // 2)
    q = measured.shape[0]
    per_fold: list[dict[float, LDSResult]] = []
    for fold in folds:
        per_fold.append(
            {
                d: lds(predicted_changes(s[:q], masks[fold]), measured[:, fold])
                for d, s in scores.items()
            }
        )
    best = [max(r, key=lambda d, r=r: r[d].mean) for r in per_fold]
    heldout = (per_fold[1][best[0]].per_query + per_fold[0][best[1]].per_query) / 2
    oracle = (per_fold[0][best[0]].per_query + per_fold[1][best[1]].per_query) / 2
    return HeldOutResult(
        chosen=(best[0], best[1]),
        heldout=_summarise(heldout.numpy()),
        best_of_sweep=_summarise(oracle.numpy()),
    )
