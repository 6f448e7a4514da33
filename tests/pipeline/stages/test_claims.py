"""The claims stage collects the stages' claims in pipeline order."""

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
    assert r.metrics["counts"] == {"holds": 4, "does not hold": 0, "inconclusive": 1}
    md = (tmp_path / "reports" / "claims.md").read_text()
    positions = [md.index(f"| claim {i} |") for i in range(len(claims_stage.INPUTS))]
    assert positions == sorted(positions) and md.count("**holds**") == 4
