"""The class-conditional U-Net (:mod:`diffusion_attribution.diffusion.conditional`) and the
labels that carry each example's class through gradients and K-FAC.

Oracles, in float64 on ``TINY_4X4``: per-example gradients with ``labels`` against a loop of
``torch.autograd.grad`` of each example called with its own class; the hooks' K-FAC with
``labels`` (the model bound to each run of equal labels) against curvlinops, which gets the
class of every row in its input dict; classifier-free guidance against eq. 6 written out.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion_attribution.attribution.influence import (
    precondition_queries,
    score_columns,
    train_gradient_scale,
)
from diffusion_attribution.attribution.scores import ScoreKey
from diffusion_attribution.core.sections import ModelConfig, TrainConfig
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.curvature.hooks import correction_sums
from diffusion_attribution.curvature.kfac import DenseCurvature
from diffusion_attribution.curvature.partial_sums import apply_corrections
from diffusion_attribution.diffusion import conditional
from diffusion_attribution.diffusion.conditional import ConditionalUNet, bound, guided
from diffusion_attribution.diffusion.ddpm import NoiseSchedule, sample
from diffusion_attribution.diffusion.gradients import flatten_params, gradient_matrix
from diffusion_attribution.diffusion.measurements import make_measurement
from diffusion_attribution.diffusion.training import build_model, save_model
from diffusion_attribution.diffusion.unet import kfac_parameters
from diffusion_attribution.evaluation.ground_truth import cache_settings, measure, measure_by_class
from tests.curvature.oracles import assert_blocks_equal, rel_fro
from tests.helpers import TINY_4X4

pytestmark = pytest.mark.usefixtures("one_thread")
K, T, N, S = 3, 20, 6, 3
SCHEDULE = NoiseSchedule.linear(T, 1e-4, 0.3)
LABELS = torch.tensor([2, 0, 0, 1, 2, 1])  # unsorted: every grouping path runs


@pytest.fixture(scope="module")
def net() -> ConditionalUNet:
    torch.manual_seed(0)
    model = ConditionalUNet(TINY_4X4, K).double().eval()
    with torch.no_grad():  # a class embedding far from zero, so the classes differ clearly
        model.class_in.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(N, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(1, T + 1, (N, S), generator=g)
    eps = torch.randn(N, S, 1, 4, 4, generator=g, dtype=torch.float64)
    return x0, t, eps


def test_the_class_enters_through_the_time_embedding_and_must_be_given(net, data):
    x0 = data[0][:2]
    t = torch.tensor([3, 7])
    outs = [net(x0, t, c) for c in range(K + 1)]
    assert all(not torch.allclose(outs[0], o) for o in outs[1:])  # K classes and the null
    rows = net(x0, t, torch.tensor([1, 2]))  # a class per row
    torch.testing.assert_close(rows[0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(rows[1], outs[2][1], rtol=0, atol=0)
    with bound(net, 2):
        torch.testing.assert_close(net(x0, t), outs[2], rtol=0, atol=0)
    assert net.bound_class is None
    with pytest.raises(ValueError, match="needs a class"):
        net(x0, t)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        net(x0, t, 4)
    # a copy's embedding is its own (the hook is bound to the copy)
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.class_in.weight.zero_()
    torch.testing.assert_close(twin(x0, t, 1), twin(x0, t, 2), rtol=0, atol=0)
    assert kfac_parameters(net)[-1] is net.class_in.weight  # K-FAC covers the embedding


@pytest.mark.parametrize("order", ["unsorted", "sorted"])  # buffered by class / streamed
@pytest.mark.parametrize("method", ["hooks", "vmap"])
@pytest.mark.parametrize("name", ["loss", "elbo", "square_norm"])
def test_gradients_with_labels_equal_a_loop_with_each_examples_class(
    net, data, method, name, order
):
    x0 = data[0]
    labels = LABELS if order == "unsorted" else LABELS.sort().values
    meas = make_measurement(name, SCHEDULE, **({"levels": 17} if name == "elbo" else {}))
    draws = meas.draw(x0, torch.arange(N), S, seed=2)
    params = kfac_parameters(net)
    rows = []
    for n in range(N):
        with bound(net, int(labels[n])):
            one = {k: v[n : n + 1] for k, v in draws.items()}
            value = meas(net, x0[n : n + 1], one)[0]
        grads = torch.autograd.grad(value, params, allow_unused=True, materialize_grads=True)
        rows.append(flatten_params(grads))
    expected = torch.stack(rows)
    got = gradient_matrix(net, params, meas, x0, draws, labels=labels, batch_size=4, method=method)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # the class matters: the same examples all taken as class 0 give other gradients
    other = gradient_matrix(net, params, meas, x0, draws, labels=torch.zeros(N, dtype=torch.int64))
    assert rel_fro(other, expected) > 1e-3
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        gradient_matrix(net, params, meas, x0, draws, labels=LABELS[:3])


@pytest.mark.parametrize("fisher", ["empirical", "type2"])
@pytest.mark.parametrize("kfac", ["expand", "reduce"])
def test_kfac_with_labels_equals_curvlinops_given_each_rows_class(net, data, fisher, kfac):
    params = kfac_parameters(net)
    kw = dict(fisher=fisher, kfac=kfac, batch_size=4, labels=LABELS)
    hooks = fit_kfac(net, params, SCHEDULE, *data, backend="hooks", **kw)
    ref = fit_kfac(net, params, SCHEDULE, *data, backend="curvlinops", **kw)
    assert_blocks_equal(hooks, ref)
    assert "class_in" in {b.layer for b in hooks.blocks}
    # the classes matter: every example as class 0 is another curvature
    zero = fit_kfac(
        net, params, SCHEDULE, *data, backend="hooks", **{**kw, "labels": torch.zeros(N).long()}
    )
    assert rel_fro(zero.to_dense(), hooks.to_dense()) > 1e-3


def test_ekfac_corrections_with_labels_equal_curvlinops(net, data):
    params = kfac_parameters(net)
    kw = dict(fisher="empirical", kfac="expand", batch_size=4, labels=LABELS)
    ref = fit_kfac(net, params, SCHEDULE, *data, backend="curvlinops", ekfac=True, **kw)
    corr = correction_sums(net, params, SCHEDULE, *data, ref, batch_size=3, labels=LABELS)
    mine = apply_corrections(ref, corr)
    scale = max(float(y.eig.abs().max()) for y in ref.blocks)
    for x, y in zip(mine.blocks, ref.blocks, strict=True):
        torch.testing.assert_close(x.eig, y.eig, rtol=1e-10, atol=1e-12 * scale)
    hooks = fit_kfac(net, params, SCHEDULE, *data, backend="hooks", ekfac=True, **kw)
    assert rel_fro(hooks.to_dense(), ref.to_dense()) < 1e-10


def test_guidance_is_eq_6_and_sampling_follows_each_rows_class(net):
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([5, 5, 5]), torch.tensor([0, 1, 2])
    w = 2.0
    expected = (1 + w) * net(x, t, y) - w * net(x, t, K)
    torch.testing.assert_close(guided(net, y, w)(x, t), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(guided(net, y, 0.0)(x, t), net(x, t, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 rows for 3 classes"):
        guided(net, y, w)(x[:2], t[:2])
    # a guided batch of three classes: each sample is the one drawn for its class alone
    model = net.float()
    try:
        both = sample(guided(model, y, w), SCHEDULE, 3, (1, 4, 4), seed=4).x0
        alone = sample(guided(model, y[1:2].expand(3), w), SCHEDULE, 3, (1, 4, 4), seed=4).x0
    finally:
        net.double()
    torch.testing.assert_close(both[1], alone[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both[0], alone[0], atol=1e-3)


def _train(images, labels, cfg, ckpt=None, p_uncond=0.2):
    model_cfg = ModelConfig(**{k: getattr(TINY_4X4, k) for k in ModelConfig.model_fields})
    return conditional.train_conditional(
        lambda: conditional.build_conditional(model_cfg, (1, 4, 4), K),
        images,
        labels,
        SCHEDULE,
        cfg,
        p_uncond,
        checkpoint_path=ckpt,
        progress=False,
    )


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_is_seeded_resumable_and_drops_the_condition(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(5)
    images = torch.rand(12, 1, 4, 4, generator=g) * 2 - 1
    labels = torch.arange(12) % K
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=3, seed=7)
    first = _train(images, labels, cfg)
    again = _train(images, labels, cfg)
    assert _same_weights(first.ema_model, again.ema_model)
    assert first.losses == again.losses and len(first.losses) == 6
    # killed after the first checkpoint, resumed: bitwise the same
    ckpt = tmp_path / "run.pt"
    short = cfg.model_copy(update={"steps": 6})
    calls = {"n": 0}
    real_save = conditional.atomic_save

    def save_then_die(obj, path):
        real_save(obj, path)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(conditional, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(images, labels, short, ckpt)
    monkeypatch.setattr(conditional, "atomic_save", real_save)
    resumed = _train(images, labels, short, ckpt)
    assert _same_weights(first.ema_model, resumed.ema_model)
    assert resumed.losses == first.losses
    # the dropout: p_uncond = 0 never trains the null class's embedding column
    never = _train(images, labels, cfg, p_uncond=0.0)
    start = copy.deepcopy(never.ema_model)
    torch.manual_seed(cfg.seed)
    init = conditional.build_conditional(
        ModelConfig(**{k: getattr(TINY_4X4, k) for k in ModelConfig.model_fields}), (1, 4, 4), K
    )
    null = K
    assert torch.equal(start.class_in.weight[:, null], init.class_in.weight[:, null])
    assert not torch.equal(first.ema_model.class_in.weight[:, null], init.class_in.weight[:, null])


def test_save_and_load_round_trip_and_name_an_unconditional_file(tmp_path, net):
    model_cfg = ModelConfig(**{k: getattr(TINY_4X4, k) for k in ModelConfig.model_fields})
    path = tmp_path / "cond.pt"
    conditional.save_conditional(path, net.float(), model_cfg, (1, 4, 4))
    net.double()
    back = conditional.load_conditional(path)
    assert conditional.is_conditional(path) and back.num_classes == K
    x, t = torch.zeros(2, 1, 4, 4), torch.tensor([1, 9])
    torch.testing.assert_close(back(x, t, 1), net.float()(x, t, 1))
    net.double()
    plain = tmp_path / "plain.pt"
    save_model(plain, build_model(model_cfg, (1, 4, 4)), model_cfg, (1, 4, 4))
    assert not conditional.is_conditional(plain)
    with pytest.raises(ValueError, match="unconditional"):
        conditional.load_conditional(plain)


def _bound_gradient(net, params, meas, x, draws, c, scale=1.0):
    """grad of one example's measurement with the model bound to its class c (autograd)."""
    with bound(net, c):
        value = scale * meas(net, x[None], {k: v[None] for k, v in draws.items()})[0]
    grads = torch.autograd.grad(value, params, allow_unused=True, materialize_grads=True)
    return flatten_params(grads)


def test_influence_with_classes_equals_brute_force_given_each_images_class(net):
    """precondition_queries / score_columns with labels == (1/N) G_q (H + lambda)^{-1} G_t^T
    with every gradient taken given its image's class (a dense PSD H stands in)."""
    params = kfac_parameters(net)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(N, 1, 4, 4, generator=g, dtype=torch.float64)
    queries = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    q_labels = torch.tensor([1, 0, 2])
    P = sum(p.numel() for p in params)
    A = torch.randn(P, P, generator=g, dtype=torch.float64) / P
    H, lam = A @ A.T, 1e-2
    loss = make_measurement("loss", SCHEDULE)
    spec = ScoreKey("kfac", "loss", "dense", lam, "none")
    pre = precondition_queries(
        net, params, queries, {"loss": loss}, {"dense": DenseCurvature(H)}, [spec],
        query_draws=4, seed=0, batch_size=2, query_labels=q_labels,
    )  # fmt: skip
    scores = score_columns(
        net, params, x0, pre, train_measurement=loss, train_draws=S, seed=0, batch_size=4,
        train_labels=LABELS,
    )[spec]  # fmt: skip
    td = loss.draw(x0, torch.arange(N), S, seed=0)
    qd = loss.draw(queries, torch.arange(3), 4, seed=1)
    scale = train_gradient_scale(16)
    Gt = torch.stack(
        [
            _bound_gradient(net, params, loss, x0[j], {k: v[j] for k, v in td.items()}, int(LABELS[j]), scale)
            for j in range(N)
        ]
    )  # fmt: skip
    Gq = torch.stack(
        [
            _bound_gradient(net, params, loss, queries[q], {k: v[q] for k, v in qd.items()}, int(q_labels[q]))
            for q in range(3)
        ]
    )  # fmt: skip
    expected = Gq @ torch.linalg.inv(H + lam * torch.eye(P, dtype=torch.float64)) @ Gt.T / N
    torch.testing.assert_close(
        scores.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max())
    )


def test_ground_truth_by_class_measures_each_query_given_its_class(net, tmp_path):
    """measure_by_class == measure of each class's queries with the model bound to it; the
    cache of measure_models keys the classes (other labels: measured again) and an
    unconditional call's settings do not change."""
    queries = torch.randn(
        4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8)
    )
    labels = torch.tensor([2, 0, 2, 1])
    measurements = {"loss": make_measurement("loss", SCHEDULE)}
    got = measure_by_class(net, measurements, queries, labels, {"loss": 5}, seed=3)
    for c in (0, 1, 2):
        ids = torch.nonzero(labels == c).flatten()
        with bound(net, c):
            alone = measure(net, measurements, queries[ids], {"loss": 5}, seed=3)
        torch.testing.assert_close(got["loss"][ids], alone["loss"], rtol=0, atol=0)
    args = (measurements, queries.float(), {"loss": 5}, 3)
    plain = cache_settings(*args)
    assert set(plain) == {"measurements", "draws", "seed", "batch", "queries", "trajectories"}
    with_labels = cache_settings(*args, labels=labels)
    assert with_labels["labels"] != cache_settings(*args, labels=labels.flip(0))["labels"]
    assert {k: with_labels[k] for k in plain} == plain
