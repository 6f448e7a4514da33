"""The offline report (diffusion_attribution.pipeline.report) on a synthetic run: every declared figure
has a caption and every claim the paper's finding; the page shows the claims, the figures, the
deviations, the stage times and the provenance; a missing input is named before anything is
written. The page of a real run is opened in headless Chromium in tests/test_smoke_run.py."""

import ast
import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest

from diffusion_attribution.evaluation import claims, retraining_claims
from diffusion_attribution.evaluation.claims import claim
from diffusion_attribution.pipeline import report, stages
from diffusion_attribution.pipeline.comparisons import FIELD_METHODS

CLAIMS = (Path(claims.__file__), Path(retraining_claims.__file__))


def test_every_declared_figure_has_a_caption():
    declared = [f for _, f in report.declared_figures()]
    assert len(declared) == len(set(declared)), "a figure is declared by two stages"
    assert set(declared) == set(report.FIGURES), (
        f"no caption: {sorted(set(declared) - set(report.FIGURES))}; "
        f"caption of no figure: {sorted(set(report.FIGURES) - set(declared))}"
    )
    for name, fig in report.FIGURES.items():
        assert fig.caption.endswith((".", "?")) and len(fig.caption) > 30, name
        # a figure named after the paper's reproduces that figure
        match = re.match(r"fig(\d+)([ab]?)_", name)
        if match:
            assert fig.paper == f"Fig. {int(match[1])}{match[2]}", name


def claim_ids() -> set[str]:
    """The id of every claim row :mod:`diffusion_attribution.evaluation.claims` can produce."""
    ids = set()
    for path in CLAIMS:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) in ("claim", "_all_parts")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                ids.add(node.args[0].value)
    return ids


def test_every_claim_has_the_papers_finding():
    ids = claim_ids()
    assert len(ids) >= 15, ids  # the paper's claims; the field's methods add theirs by key
    ids |= set(FIELD_METHODS)
    assert ids == set(report.PAPER_FINDINGS), ids ^ set(report.PAPER_FINDINGS)


def fake_run(root: Path) -> list[dict]:
    """What the stages write that the report reads, with made-up values."""
    rows = [
        claim("kfac_beats_trak", "K-FAC beats TRAK", "Fig. 2a", "0.6 vs 0.4 <b>", "holds"),
        claim("observation2", "Observation 2", "Figs. 13, 14", "81%", "does not hold (rule)"),
    ]
    (root / "metrics").mkdir()
    counts = {"holds": 1, "does not hold": 1, "inconclusive": 0}
    (root / "metrics" / "claims.json").write_text(json.dumps({"counts": counts, "claims": rows}))
    (root / "outputs" / "evaluate").mkdir(parents=True)
    (root / report.DEVIATIONS).write_text(
        "setting,paper (CIFAR-2),this run,why,measured effect\nseeds K,5,3,budget,-0.01\n"
    )
    (root / "reports" / "figures").mkdir(parents=True)
    for _, name in report.declared_figures():
        plt.imsave(root / "reports" / "figures" / name, np.eye(4))
    (root / "reports" / "notebooks").mkdir()
    for i, name in enumerate(stages.NAMES):
        nb = nbformat.v4.new_notebook(
            cells=[
                nbformat.v4.new_markdown_cell(f"# Stage {name}"),
                nbformat.v4.new_code_cell("print('hello')"),
            ]
        )
        nb.metadata["papermill"] = {"duration": 1.5 + i, "start_time": "2026-01-01T10:00:00.1"}
        nbformat.write(nb, root / "reports" / "notebooks" / stages.module(name).NOTEBOOK)
    (root / "params.yaml").write_text("data: {}\n")
    return rows


def test_report_of_a_run(tmp_path):
    fake_run(tmp_path)
    page = report.build(tmp_path)
    text = page.read_text()
    assert page == tmp_path / "reports" / "index.html"
    assert page.stat().st_mode & 0o044, "the report is readable by others (umask permitting)"
    # the claims with the paper's finding beside this run's evidence (escaped) and verdict
    assert report.PAPER_FINDINGS["kfac_beats_trak"] in text
    assert "0.6 vs 0.4 &lt;b&gt;" in text and '<span class="fails">does not hold' in text
    assert "2 claims: 1 hold, 1\ndo not hold" in text
    assert "not comparable" in text
    # every figure, its caption and the paper's figure
    for _, name in report.declared_figures():
        assert f'src="figures/{name}"' in text
        assert report.FIGURES[name].caption.replace("'", "&#x27;") in text
    assert "<b>Fig. 2a</b> (reproduced)" in text
    assert "<td>seeds K</td><td>5</td><td>3</td>" in text
    # the stages with their times and rendered notebooks, code collapsible, no CDN
    for i, name in enumerate(stages.NAMES):
        rendered = Path(stages.module(name).NOTEBOOK).with_suffix(".html").name
        assert f'<a href="notebooks_html/{rendered}">' in text
        html = (tmp_path / "reports" / "notebooks_html" / rendered).read_text()
        assert f"Stage {name}" in html and "details.da-code" in html
        assert not re.search(r"""(src|href)=["']https?:""", html), rendered
        assert f"<td>{1.5 + i:.1f}</td>" in text
    # provenance: outside git there is no commit; the params hash; the packages
    assert "<td>commit</td><td>none</td>" in text
    assert "<td>sha256 of params.yaml</td><td>" in text and "<td>torch</td>" in text
    assert not re.search(r"""(src|href)=["']https?:""", text)


@pytest.mark.parametrize(
    "remove",
    ["metrics/claims.json", report.DEVIATIONS, "reports/figures/fig03_counterfactual.png",
     "reports/notebooks/07_retrain.ipynb"],
)  # fmt: skip
def test_a_missing_input_is_named_before_anything_is_written(tmp_path, remove):
    fake_run(tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(Path(remove).name)):
        report.build(tmp_path)
    assert not (tmp_path / "reports" / "index.html").exists()
    assert not (tmp_path / report.NOTEBOOKS_HTML).exists()
