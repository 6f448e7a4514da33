"""The shipped bundles in ``results/``: each checks (claims equal metrics, figures exist, the
shipped scores give the shipped LDS), a method of this test's own is scored against the
shipped ground truth with the bundle README's NumPy recipe, and the README's results paragraph
is what ``results readme`` writes. Stale bundles pass and are reported."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from diffusion_attribution.pipeline.bundle import LDS_RECIPE
from diffusion_attribution.pipeline.docs_tables import FINDINGS_BEGIN, FINDINGS_END, findings_block
from diffusion_attribution.pipeline.results import (
    GENERATED_FILES,
    REPO,
    RESULTS,
    check,
    generated_blocks,
)

BUNDLES = sorted(p for p in RESULTS.glob("*") if (p / "manifest.json").exists())


def test_the_default_bundle_is_shipped():
    assert (RESULTS / "default" / "manifest.json").exists(), "results/default/ is missing"


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_a_shipped_bundle_checks(bundle):
    report = check(bundle)
    print(report.first_line)  # fresh or STALE (allowed): the CI log says which
    assert report.problems == [], report.problems
    size = sum(f.stat().st_size for f in RESULTS.rglob("*") if f.is_file())
    assert size < 60 * 2**20, f"results/ is {size / 2**20:.1f} MiB, over 60 MiB"


def _recipe_lds(bundle, scores, monkeypatch) -> float:
    monkeypatch.chdir(bundle)
    namespace = {"my_scores": scores}
    exec(LDS_RECIPE, namespace)  # the README's recipe, as a reader runs it
    return float(namespace["lds"])


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_a_new_method_is_scored_against_the_shipped_ground_truth(bundle, monkeypatch):
    """Random scores give an LDS near 0; the shipped K-FAC scores give the shipped K-FAC LDS."""
    gt = np.load(bundle / "ground_truth.npz")
    q, n = gt["subsets.loss"].shape[0], gt["masks"].shape[1]
    assert gt["queries"].shape[0] >= q and gt["train_images"].shape[0] == n
    rng = np.random.default_rng(0)
    noise = np.mean(
        [_recipe_lds(bundle, rng.standard_normal((q, n)), monkeypatch) for _ in range(5)]
    )
    assert abs(noise) < 0.1, noise  # 5 x Q queries of chance: standard error ~ 1 / sqrt(5 Q M)
    index = json.loads((bundle / "scores.json").read_text())
    (name,) = [
        k for k, e in index.items()
        if e["lds"].get("loss", {}).get("label") == "K-FAC influence"
    ]  # fmt: skip
    kfac = np.load(bundle / "scores.npz")[name][:q]
    assert _recipe_lds(bundle, kfac, monkeypatch) == pytest.approx(
        index[name]["lds"]["loss"]["lds"], abs=1e-9
    )
    shipped = json.loads((bundle / "metrics" / "lds.json").read_text())["loss"]["K-FAC influence"]
    assert index[name]["lds"]["loss"]["lds"] == pytest.approx(shipped["lds"], abs=5e-5)


@pytest.mark.parametrize("name", GENERATED_FILES)
def test_the_result_numbers_of_the_docs_are_generated(name):
    """README.md's results paragraph and claims table (and docs/results.md's) are what
    ``results readme`` writes from the shipped bundles: no hand-typed result number there."""
    blocks = generated_blocks((REPO / name).read_text())
    assert blocks, f"{name} has no generated block"
    for found, expected in blocks:
        assert found == expected, (
            f"{name} differs from the shipped bundles: run `python -m diffusion_attribution.pipeline.results readme`"
        )


def test_a_claims_number_that_is_in_no_metric_breaks_the_bundle(tmp_path):
    """The claims table and claims.json edited alike (so the rows still agree): the edited
    number is found in no metric, to its printed precision and with its sign."""
    bundle = shutil.copytree(RESULTS / "default", tmp_path / "default")
    claims_json = bundle / "metrics" / "claims.json"
    data = json.loads(claims_json.read_text())
    entry = next(c for c in data["claims"] if c["id"] == "kfac_beats_trak")
    old = re.search(r"\+\d\.\d{3}", entry["evidence"]).group(0)  # the paired difference
    for new in (f"+{float(old) + 0.004:.3f}", f"-{old[1:]}"):  # off by 4 in the last digit; sign
        text = entry["evidence"].replace(old, new)
        claims_md = (RESULTS / "default" / "claims.md").read_text()
        (bundle / "claims.md").write_text(claims_md.replace(entry["evidence"], text))
        edited = {
            **data,
            "claims": [{**c, "evidence": text} if c is entry else c for c in data["claims"]],
        }
        claims_json.write_text(json.dumps(edited))
        problems = check(bundle).problems
        assert problems == [f"claim 'kfac_beats_trak': {new} not in the metrics"], problems


def test_findings_table_reads_every_method_from_the_bundle(tmp_path):
    """The docs' per-method table: each bar of the loss and ELBO charts with its standard
    error, the held-out damping, the independent-seed check and the counterfactual."""
    bundle = tmp_path / "toy"
    (bundle / "metrics").mkdir(parents=True)
    lds = {
        "loss": {
            "K-FAC influence": {"lds": 0.6, "stderr": 0.03},
            "TRAK*": {"lds": 0.4, "stderr": 0.04},
        },
        "elbo": {"K-FAC influence (m. loss)": {"lds": 0.5, "stderr": 0.02}},
        "heldout_damping": {"loss: TRAK": {"lds": 0.38, "stderr": 0.05, "best_of_sweep": 0.41}},
        "independent_seeds": {"K-FAC influence": {"shared": 0.5, "independent": 0.3}},
    }
    (bundle / "metrics" / "lds.json").write_text(json.dumps(lds))
    cf = {"mean_change": {"kfac@0.02": 0.25, "kfac@0.1": 0.9, "random@0.02": -0.01}}
    (bundle / "metrics" / "counterfactual.json").write_text(json.dumps(cf))
    text = findings_block(tmp_path)
    assert text.startswith(FINDINGS_BEGIN) and text.endswith(FINDINGS_END)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | loss LDS | held-out damping | ELBO LDS")
    assert rows[0].endswith("| counterfactual 2% | counterfactual 10% |")
    assert (
        rows[1] == "| K-FAC influence | 0.600 ± 0.030 |  |  |  | 0.500 -> 0.300 | +0.250 | +0.900 |"
    )
    assert rows[2] == "| TRAK* | 0.400 ± 0.040 | 0.380 ± 0.050 |  |  |  |  |  |"
    assert rows[3] == "| K-FAC influence (m. loss) |  |  | 0.500 ± 0.020 |  |  |  |  |"
    assert rows[4] == "| random removal |  |  |  |  |  | -0.010 |  |"
