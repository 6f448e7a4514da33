"""What the paper reports for each claim this artifact tests, by claim id
(:mod:`diffusion_attribution.evaluation.claims`): the paper's statement, with its section or
figure and its number where the paper's text gives one (its bar charts' values are in its
figures only). The claims table and the report print it beside this run's number."""

from __future__ import annotations

#: What the paper reports for each claim (by claim id): its statement, and its number where the
#: paper's text gives one (the bar charts' values are in its figures only).
PAPER_FINDINGS: dict[str, str] = {
    "int8": "quantising to 8 bits leaves the ordering almost unchanged; SVD compression is "
    "clearly worse (App. C, Fig. 6; values in the figure)",
    "kfac_beats_trak": "K-FAC influence outperforms TRAK in all settings, CIFAR-2 and CIFAR-10 "
    "(Fig. 2a; values in the figure)",
    "kfac_beats_trak_elbo": "K-FAC influence outperforms TRAK in all settings (Sec. 4), the "
    "ELBO's included (Fig. 2b; values in the figure)",
    "kfac_vs_dtrak": "K-FAC influence sometimes outperforms the hand-tuned D-TRAK; with tuned "
    "damping it reaches 18.3% ± 0.7 LDS on CIFAR-10 and outperforms both (Sec. 4)",
    "tuned_kfac_vs_tuned": "with tuned damping K-FAC influence outperforms both TRAK and "
    "D-TRAK: 18.3% ± 0.7 LDS on CIFAR-10 (Sec. 4)",
    "elbo_mloss": "substituting the loss predicts the change of the ELBO better than the ELBO "
    "itself (Fig. 2b; values in the figure)",
    "trajectory_mloss": "the trajectory's probability suffers from the same issues as the ELBO "
    "on CIFAR-2: it is better approximated by the wrong measurement function (App., Fig. 17)",
    "mc_beats_empirical": "the MC Fisher performs better than the empirical Fisher (Fig. 4; "
    "values in the figure)",
    "expand_beats_reduce": "K-FAC expand significantly outperforms K-FAC reduce (Fig. 4; values "
    "in the figure)",
    "damping": "any sufficiently small damping works for K-FAC; TRAK and D-TRAK do not perform "
    "at all with too small a damping (App. D, Figs. 7-10)",
    "trak_float16": "traker's default float16 precision gives significantly degraded results; "
    "float32 is recommended (App. G.3.1, Fig. 18)",
    "projection_dimension": "the projection dimension affected the best obtainable results "
    "significantly, so a smaller one would not do (App. G.3.1; 32768 used)",
    "observation1": "Observation 1: higher-timestep losses act as better proxies for "
    "lower-timestep losses in the influence approximation, not under retraining (Figs. 11, 12)",
    "observation2": "Observation 2: influence functions predict both increases and decreases of "
    "the loss, but removing data mostly increases it (Figs. 13, 14)",
    "observation3": "Observation 3: the ELBO is close to constant on generated samples whichever "
    "examples were removed (Fig. 15)",
    "counterfactual": "K-FAC consistently picks more influential examples than the baselines, "
    "CIFAR-2 and CIFAR-10, 2% and 10% removed (Fig. 3; values in the figure)",
    "kfac_vs_journey_trak": "not in the paper, which cites Journey-TRAK (Georgiev et al., 2023): "
    "TRAK of the denoising loss along the sample's trajectory; here its steps are averaged, as "
    "D-TRAK's authors do when they compare with it",
    "kfac_vs_das": "not in the paper; DAS (Lin et al., ICLR 2025) reports LDS above D-TRAK's on "
    "CIFAR-2 and ArtBench-2 under its own protocol (64 subsets x 3 seeds, damping tuned on the "
    "evaluation subsets); here its authors' DAS1 form, on this run's ground truth",
    "kfac_vs_feature_nn": "not in the paper; model-free nearest-neighbour attribution (NDA) "
    "reaches 0.160 LDS on CIFAR-2 against D-TRAK's 0.191 in D-TRAK's own notebooks",
}
