"""Stage ``curvature``: K-FAC of GGN^model (MC Fisher) and GGN^loss (empirical Fisher),
expand and reduce (Sec. 3.1, eqs. 9-12), fitted on the training set (``fit_kfac``'s default
hooks backend; curvlinops is the reference it is tested against).

The MC and the empirical Fisher are on one scale (:mod:`diffusion_attribution.curvature.kfac`), as in
curvlinops and the paper's code, so a damping value means the same for all variants;
``ekfac_mc_expand`` is MC / expand with EK-FAC's eigenvalue correction.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import torch

from diffusion_attribution.core.config import Config
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.pipeline.attributed import attributed_model
from diffusion_attribution.pipeline.shards.curvature import sharded_curvatures
from diffusion_attribution.pipeline.stages import StageResult
from diffusion_attribution.pipeline.workspace import Workspace

NOTEBOOK = "04_curvature.ipynb"
INPUTS = ("outputs/data", "outputs/train")
OUTS = ("outputs/curvature",)
PERSIST: tuple[str, ...] = ()
FIGURES = ("curvature_spectra.png",)
METRICS = ("metrics/curvature.json",)


def run(config: Config, ws: Workspace) -> StageResult:
    """Fit every variant in ``curvature.variants``; save them with their spectra's summary."""
    ccfg = config.curvature
    damping = config.influence.damping
    ds = ImageDataset.load(ws.path(ws.TRAIN_SET))
    net, params = attributed_model(ws)
    print(
        f"{len(ds)} examples x {ccfg.num_draws} draws = {len(ds) * ccfg.num_draws} rows; "
        f"{sum(p.numel() for p in params):,} parameters in {len(params)} tensors"
    )
    rows, spectra = [], {}
    fitted = sharded_curvatures(
        ws, ccfg.variants, diffusion=config.diffusion, curvature=config.curvature, num_train=len(ds)
    )
    for variant, K in fitted:  # one at a time: at paper scale each holds GBs
        K.save(ws.out(ws.CURVATURE.format(variant=variant)))
        ev, fit_seconds = K.eigenvalues().cpu(), K.meta["fit_seconds"]
        del K
        spectra[variant] = spectrum_quantiles(ev)
        rows.append(
            {
                "variant": variant,
                "fit_seconds": round(fit_seconds, 2),
                "mean_eigenvalue": float(ev.mean()),
                "max_eigenvalue": float(ev.max()),
                "fraction_below_damping": float((ev < damping).double().mean()),
                "damping_over_mean_eigenvalue": damping / float(ev.mean()),
            }
        )
    table = pd.DataFrame(rows).set_index("variant")
    metrics = table.round(8).to_dict(orient="index")
    ws.write_metrics("curvature", metrics)
    mc = table.loc["mc_expand"] if "mc_expand" in table.index else table.iloc[0]
    summary = (
        f"**This run.** Fit times: {', '.join(f'{v} {r.fit_seconds:.1f} s' for v, r in table.iterrows())}. "
        f"For MC/expand the mean eigenvalue is {mc.mean_eigenvalue:.3g} (max {mc.max_eigenvalue:.3g}); the damping "
        f"{damping:g} is {mc.damping_over_mean_eigenvalue:.2g} times the mean eigenvalue, and "
        f"{100 * mc.fraction_below_damping:.1f}% of the eigenvalues lie below it (directions the damping, not the data, "
        f"determines)."
    )
    return StageResult(
        metrics=metrics,
        tables={"variants": table},
        data={"spectra": spectra, "damping": damping},
        summary=summary,
    )


def spectrum_quantiles(ev: torch.Tensor, points: int = 10_000) -> torch.Tensor:
    """The eigenvalues sorted in descending order, subsampled to at most ``points`` evenly
    spaced ranks (the first and the last kept): what Fig. spectra draws (35.7 M points per
    variant at paper scale would be slow to plot and look no different)."""
    ev = ev.sort(descending=True).values
    if len(ev) <= points:
        return ev
    return ev[torch.linspace(0, len(ev) - 1, points).round().long()]


def fig_spectra(result: StageResult) -> plt.Figure:
    """Sorted eigenvalues of every variant against the damping."""
    damping = result.data["damping"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, ev in result.data["spectra"].items():
        ax.plot(torch.linspace(0, 1, len(ev)), ev.clamp_min(1e-20), label=variant, lw=1.2)
    ax.axhline(damping, color="k", ls="--", lw=0.8, label=f"damping {damping:g}")
    ax.set(
        yscale="log",
        xlabel="eigenvalue rank (fraction of parameters)",
        ylabel="eigenvalue",
        title="K-FAC eigenvalue spectra (per-pixel-mean loss normalisation)",
    )
    ax.legend(fontsize=8)
    return fig
