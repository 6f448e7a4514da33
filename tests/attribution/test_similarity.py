"""The similarity baselines, by hand."""

import math

import pytest
import torch

from diffusion_attribution.attribution.similarity import (
    bottleneck_features,
    feature_cosine,
    gradient_cosine,
    gradient_dot,
    pixel_similarity,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: more OpenMP threads only contend


def test_pixel_similarity_by_hand():
    # 1x1x2 "images": distances from q0 = (0, 0) are 0, 5, 1; from q1 = (3, 0) they are 3, 4, sqrt(10)
    train = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]).reshape(3, 1, 1, 2)
    queries = torch.tensor([[0.0, 0.0], [3.0, 0.0]]).reshape(2, 1, 1, 2)
    got = pixel_similarity(queries, train, bandwidth=1.0)
    d2 = torch.tensor([[0.0, 25.0, 1.0], [9.0, 16.0, 10.0]])
    torch.testing.assert_close(got, torch.exp(-d2 / 2))
    # default bandwidth: median of the six distances 0, 1, 3, sqrt(10), 4, 5 -> torch's lower
    # median is 3
    torch.testing.assert_close(pixel_similarity(queries, train), torch.exp(-d2 / 18))
    assert pixel_similarity(queries, train).dtype == torch.float32


def test_gradient_dot_and_cosine():
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, -3.0], [1.0, 1.0]])
    torch.testing.assert_close(
        gradient_dot(q, t), torch.tensor([[2.0, 0.0, 1.0], [2.0, -3.0, 2.0]]) / 3
    )
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(gradient_cosine(q, t), torch.tensor([[1.0, 0.0, r], [r, -r, 1.0]]))


def test_bottleneck_features_are_the_mid_block_output(tiny):
    model, _, _, x = tiny
    seen = []
    handle = model.mid2.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        model(x, torch.ones(len(x), dtype=torch.int64))
    handle.remove()
    feats = bottleneck_features(model.train(), x, batch_size=3)  # batches and mode do not matter
    assert model.training  # restored
    model.eval()
    torch.testing.assert_close(feats, seen[0].flatten(1))
    assert feats.dtype == torch.float32 and feats.shape[0] == len(x)
    # the nearest neighbour of an image is itself
    cos = feature_cosine(feats, feats)
    assert torch.equal(cos.argmax(1), torch.arange(len(x)))
    torch.testing.assert_close(cos.diagonal(), torch.ones(len(x)))
    with pytest.raises(ValueError, match="no submodule 'mid_block'"):
        bottleneck_features(model, x, module="mid_block")
