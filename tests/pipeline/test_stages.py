"""The analysis stages as library functions, on hand-made scores and ground truth.

`evaluate.evaluate` and `observations.observations` take score matrices and measurements and
return every number, table and claim their notebooks show; here the truth is known by
construction: the measured change of each target is the sum of "true" scores over the removed
examples plus seed noise, K-FAC's scores are the true ones (plus a little noise), TRAK's are
noise at small damping and partly true at large damping, and so on.
"""

import pandas as pd
import pytest
import torch

from diffusion_attribution.attribution.scores import ScoreKey, ScoreSet
from diffusion_attribution.evaluation.lds import subset_masks
from diffusion_attribution.pipeline.stages import claims as claims_stage
from diffusion_attribution.pipeline.stages.evaluate import evaluate
from diffusion_attribution.pipeline.stages.observations import observations, upper_beats_diagonal

N, Q, M, K = 40, 12, 16, 3
VARIANTS = ("mc_expand", "mc_reduce", "empirical_expand", "empirical_reduce")
TIMESTEPS = (10, 100)
TARGETS = ("loss", "elbo", "trajectory", "l_t=10", "l_t=100")


@pytest.fixture(scope="module")
def world():
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


def test_evaluate_protocol_additions(world):
    """The upper bound sits above the best method, Fig. 4 is compared at three dampings, and
    the independent-seed check compares like with like."""
    scores, measured, _, masks = world
    g = torch.Generator().manual_seed(5)
    # independent-seed models on the first 8 subsets: the same truth, other seed noise
    indep = measured["loss"][:, :8, 0] + 0.5 * torch.randn(Q, 8, generator=g, dtype=torch.float64)
    more = dict(scores.scores)
    for v in VARIANTS[1:]:  # a damping sweep for every variant
        for d in (1e-6, 1e-4):
            for m in ("loss", "elbo"):
                more[ScoreKey("kfac", m, v, d, "int8")] = scores[
                    ScoreKey("kfac", m, v, 1e-8, "int8")
                ]
    # EK-FAC: between the true scores and K-FAC's
    more[ScoreKey("kfac", "loss", "ekfac_mc_expand", 1e-8, "int8")] = scores[
        ScoreKey("kfac", "loss", "mc_expand", 1e-8, "int8")
    ]
    r = evaluate(
        ScoreSet(more, scores.meta),
        {t: measured[t] for t in ("loss", "elbo", "trajectory")},
        masks,
        variants=VARIANTS,
        damping=1e-8,
        compression="int8",
        independent={"loss": indep},
    )
    bars = r.metrics["loss"]
    kfac, bound = bars["K-FAC influence"], bars["upper bound (K-seed mean)"]
    assert bound["lds"] >= kfac["lds"] - 2 * kfac["stderr"]
    assert bars["seed reproducibility"]["lds"] < bound["lds"]
    settings = {k.split("/")[1] for k in r.metrics["hessian_ablation"]}
    assert settings == {"fixed", "best", "held-out"}
    assert len(r.metrics["hessian_ablation"]) == 2 * 3 * len(VARIANTS)
    # MC expand (noise 0.1) beats empirical expand (noise 0.5) at every damping setting
    diffs = r.metrics["hessian_ablation_differences"]
    for setting in ("fixed", "best", "held-out"):
        d = diffs[f"loss/{setting}: MC - empirical (expand)"]
        assert d["mean"] > 2 * d["stderr"], (setting, d)
    assert "EK-FAC influence" in bars
    assert r.metrics["paired_differences"]["loss: EK-FAC - K-FAC"]["mean"] == 0.0
    assert "loss: EK-FAC - D-TRAK*" in r.metrics["paired_differences"]
    t = r.tables["independent_seeds"]
    assert "K-FAC influence" in t.index
    # same truth, same noise level: the seed design changes K-FAC's LDS by little
    assert abs(float(t.loc["K-FAC influence", "independent - shared"])) < 0.15
    assert set(r.metrics["independent_seeds"]) == set(t.index)


def test_evaluate_ranks_methods_and_decides_claims(world):
    scores, measured, _, masks = world
    r = evaluate(
        scores,
        {t: measured[t] for t in ("loss", "elbo", "trajectory")},
        masks,
        variants=VARIANTS,
        damping=1e-8,
        compression="int8",
    )
    table = r.tables["lds"]
    assert {
        "method",
        "curvature",
        "measurement",
        "damping",
        "compression",
        "precision",
        "target",
        "lds",
    } <= set(table)
    bars = r.metrics["loss"]
    assert (
        bars["K-FAC influence"]["lds"]
        > 0.9
        > bars["TRAK*"]["lds"]
        > bars["pixel similarity"]["lds"]
    )
    # TRAK* is the best of its sweep: relative damping 1 (level 1.0), not 1e-3 (noise)
    trak_rows = table[
        (table.method == "trak")
        & (table.measurement == "loss")
        & (table.target == "loss")
        & (table.precision == "float32")
    ]
    assert float(trak_rows.lds.max()) == pytest.approx(bars["TRAK*"]["lds"], abs=1e-4)
    assert set(trak_rows.relative_damping.round(6)) == {1e-3, 1.0, 10.0}
    verdicts = {c["id"]: c["verdict"] for c in r.claims}
    assert verdicts["kfac_beats_trak"] == "holds"
    assert verdicts["kfac_vs_dtrak"].startswith("holds (ahead")
    assert verdicts["mc_beats_empirical"] == "holds"
    assert verdicts["expand_beats_reduce"] == "holds"
    # the loss's scores are unrelated to the ELBO's change here: substituting them is worse
    assert verdicts["elbo_mloss"].startswith(("does not hold", "inconclusive"))
    # K-FAC's sweep is flat (same quality at every damping), TRAK's collapses at small damping
    assert verdicts["damping"] == "holds"
    assert set(r.metrics["paired_differences"]) >= {
        "loss: K-FAC - TRAK*",
        "loss: MC - empirical (expand)",
    }
    assert "K-FAC influence" in r.summary and "holds" in r.summary
    assert list(r.tables["heldout"].index) == [
        "loss: K-FAC influence",
        "loss: TRAK",
        "loss: D-TRAK",
        "elbo: K-FAC influence",
        "elbo: TRAK",
    ]


def test_observations_counts_and_claims(world):
    scores, measured, reference, masks = world
    table = evaluate(
        scores, measured, masks, variants=VARIANTS, damping=1e-8, compression="int8"
    ).tables["lds"]
    r = observations(
        scores,
        table,
        measured,
        reference,
        masks,
        variant="mc_expand",
        damping=1e-8,
        compression="int8",
        timesteps=TIMESTEPS,
    )
    assert list(r.tables["fig11"].index) == ["l_t=10", "l_t=100"]
    assert r.metrics["fig11_upper_beats_diagonal"] == len(upper_beats_diagonal(r.tables["fig11"]))
    assert r.metrics["fig05"]["theta_full"] == pytest.approx(0.0, abs=1e-9)
    ids = [c["id"] for c in r.claims]
    assert ids == ["observation1", "observation2"]
    # predicted and actual changes come from the same true scores: they agree in sign as often
    obs2 = r.metrics["observation2"]["loss"]
    assert abs(obs2["predicted_increase"] - obs2["actual_increase"]) < 0.2
    assert r.claims[1]["verdict"].startswith("does not hold")


def test_upper_beats_diagonal_hand_worked():
    m = pd.DataFrame(
        [[0.5, 0.6, 0.4], [0.0, 0.3, 0.2], [0.0, 0.0, 0.9]], index=list("abc"), columns=list("abc")
    )
    assert upper_beats_diagonal(m) == [("a", "b")]


def test_claims_stage_collects_in_pipeline_order(tmp_path):
    from diffusion_attribution.core.config import Config
    from diffusion_attribution.evaluation.claims import claim
    from diffusion_attribution.pipeline.workspace import Workspace, write_json

    ws = Workspace(tmp_path)
    for i, path in enumerate(claims_stage.INPUTS):
        write_json(
            ws.path(path),
            {
                "claims": [
                    claim(
                        f"c{i}", f"claim {i}", "Fig. 1", "e", "holds" if i else "inconclusive (x)"
                    )
                ]
            },
        )
    r = claims_stage.run(Config(), ws)
    assert [c["id"] for c in r.claims] == [f"c{i}" for i in range(len(claims_stage.INPUTS))]
    assert r.metrics["counts"] == {"holds": 4, "does not hold": 0, "inconclusive": 1}
    md = (tmp_path / "reports" / "claims.md").read_text()
    positions = [md.index(f"| claim {i} |") for i in range(len(claims_stage.INPUTS))]
    assert positions == sorted(positions) and md.count("**holds**") == 4
