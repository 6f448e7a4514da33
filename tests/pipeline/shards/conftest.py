"""The fan-outs' workspace (:mod:`tests.pipeline.shards.smoke`), run in-process once for the
package."""

import pytest

from diffusion_attribution.core.config import parse_config
from diffusion_attribution.pipeline.stages import curvature, data, sample, train
from diffusion_attribution.pipeline.workspace import Workspace
from tests.pipeline.shards.smoke import small_smoke_params


@pytest.fixture(scope="package")
def smoke_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    config = parse_config(small_smoke_params())
    ws = Workspace(root, device="cpu", threads=2)
    for stage in (data, train, sample, curvature):
        stage.run(config, ws)
    return config, root
