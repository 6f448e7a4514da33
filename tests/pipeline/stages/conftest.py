"""The analysis stages' hand-made scores and ground truth (:mod:`tests.pipeline.stages.world`),
made once for the package."""

import pytest

from tests.pipeline.stages.world import make_world


@pytest.fixture(scope="package")
def world():
    return make_world()
