"""The claims stage collects the stages' claims in pipeline order and writes the headline."""

import json

from diffusion_attribution.core.config import Config
from diffusion_attribution.evaluation.claims import claim
from diffusion_attribution.pipeline.stages import claims as claims_stage
from diffusion_attribution.pipeline.workspace import Workspace, write_json


def test_claims_stage_collects_in_pipeline_order(tmp_path):
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
    n = len(claims_stage.INPUTS)
    assert r.metrics["counts"] == {"holds": n - 1, "does not hold": 0, "inconclusive": 1}
    md = (tmp_path / "reports" / "claims.md").read_text()
    positions = [md.index(f"| claim {i} |") for i in range(len(claims_stage.INPUTS))]
    assert positions == sorted(positions) and md.count("**holds**") == n - 1


def test_headline_has_each_methods_lds_the_ceiling_counts_and_run_time(tmp_path):
    ws = Workspace(tmp_path)
    lds = {
        "loss": {
            "K-FAC influence": {"lds": 0.6, "stderr": 0.03},
            "TRAK*": {"lds": 0.4, "stderr": 0.04},
            "approximate ceiling (K-seed mean)": {"lds": 0.9, "stderr": 0.01},
        }
    }
    for path in claims_stage.INPUTS:
        write_json(ws.path(path), {"claims": []} | (lds if path == "metrics/lds.json" else {}))
    (tmp_path / "params.yaml").write_text("a: 1\n")
    stages = tmp_path / "reports" / "stages"
    stages.mkdir(parents=True)
    sha = __import__("hashlib").sha256(b"a: 1\n").hexdigest()
    # the longest run of this parameters file counts; another profile's run does not
    runs = [{"seconds": 60.0, "params_sha256": sha}, {"seconds": 6.0, "params_sha256": sha}]
    other = {"seconds": 6000.0, "params_sha256": "0" * 64}
    (stages / "train.json").write_text(json.dumps({"stage": "train", "runs": [*runs, other]}))
    (stages / "data.json").write_text(json.dumps({"stage": "data", "runs": [{"seconds": 30.0}]}))
    claims_stage.run(Config(), ws)
    head = json.loads((tmp_path / "metrics" / "headline.json").read_text())
    assert head == {
        "loss_lds": {"K-FAC influence": 0.6, "TRAK*": 0.4},
        "loss_lds_stderr": {"K-FAC influence": 0.03, "TRAK*": 0.04},
        "approximate_ceiling": 0.9,
        "claims": {"holds": 0, "does not hold": 0, "inconclusive": 0},
        "run_minutes": 1.5,
    }
