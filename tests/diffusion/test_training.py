"""Training loop: determinism, resumption, weight decay really applied, learning-rate schedule."""

import pytest
import torch

from diffusion_attribution.core.sections import ModelConfig, TrainConfig
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.stacked import StackedUNet
from diffusion_attribution.diffusion.training import (
    build_model,
    load_model,
    lr_lambda,
    save_model,
    train_ddpm,
    train_stack,
)

SCHEDULE = NoiseSchedule.linear(100, 1e-3, 0.2)
MODEL = ModelConfig(
    base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), norm_groups=4
)
SHAPE = (1, 8, 8)


def images(n=20):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def run(cfg, **kw):
    return train_ddpm(
        lambda: build_model(MODEL, SHAPE), images(), SCHEDULE, cfg, progress=False, **kw
    )


def flat(model):
    return torch.cat(
        [p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()]
    )


def test_same_seed_same_model_other_seed_other_model():
    cfg = TrainConfig(steps=6, batch_size=8, warmup_steps=2, checkpoint_every=3)
    a, b = run(cfg), run(cfg)
    c = run(cfg.model_copy(update={"seed": 1}))
    assert torch.equal(flat(a.ema_model), flat(b.ema_model)) and a.losses == b.losses
    assert not torch.equal(flat(a.ema_model), flat(c.ema_model))


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    full = run(
        TrainConfig(steps=8, batch_size=8, warmup_steps=2, checkpoint_every=4, ema_decay=0.9)
    )
    ckpt = tmp_path / "ckpt.pt"
    # "Interrupt" during step 6, after the checkpoint at step 4, by raising inside the
    # (stacked) network's forward.
    cfg = TrainConfig(steps=8, batch_size=8, warmup_steps=2, checkpoint_every=4, ema_decay=0.9)
    calls = {"n": 0}
    forward = StackedUNet.forward

    class Interrupt(Exception):
        pass

    def interrupting(self, x, t):
        calls["n"] += 1
        if calls["n"] == 6:
            raise Interrupt
        return forward(self, x, t)

    monkeypatch.setattr(StackedUNet, "forward", interrupting)
    with pytest.raises(Interrupt):
        train_ddpm(
            lambda: build_model(MODEL, SHAPE), images(), SCHEDULE, cfg, checkpoint_path=ckpt,
            progress=False,
        )  # fmt: skip
    monkeypatch.setattr(StackedUNet, "forward", forward)
    assert ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] == 4
    resumed = train_ddpm(
        lambda: build_model(MODEL, SHAPE),
        images(),
        SCHEDULE,
        cfg,
        checkpoint_path=ckpt,
        progress=False,
    )
    assert resumed.losses == full.losses
    torch.testing.assert_close(flat(resumed.ema_model), flat(full.ema_model), rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_weight_decay_is_passed_to_the_optimiser():
    """With lr > 0 and no gradient signal difference, only weight decay separates two runs;
    AdamW's decoupled decay shrinks weights: theta <- theta - lr * wd * theta per step."""
    base = TrainConfig(steps=3, batch_size=8, warmup_steps=1, lr=1e-3)
    a = run(base)
    b = run(base.model_copy(update={"weight_decay": 10.0}))
    assert not torch.equal(flat(a.model), flat(b.model))
    assert flat(b.model).norm() < flat(a.model).norm()


def test_learning_rate_schedule_warmup_then_cosine():
    f = lr_lambda(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert (
        f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    )
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_training_lowers_the_loss():
    r = run(TrainConfig(steps=60, batch_size=16, warmup_steps=5, lr=3e-3))
    first, last = sum(r.losses[:10]) / 10, sum(r.losses[-10:]) / 10
    assert last < 0.8 * first


def test_model_round_trip_weights_only(tmp_path):
    net = build_model(MODEL, SHAPE).eval()
    save_model(tmp_path / "m.pt", net, MODEL, SHAPE)
    loaded = load_model(tmp_path / "m.pt")
    x, t = torch.randn(2, *SHAPE), torch.tensor([3, 70])
    torch.testing.assert_close(loaded(x, t), net(x, t))


def test_a_stack_trains_each_run_as_if_alone():
    """float64: three runs of a stack (other subsets, other seeds) end with the weights, EMA
    and losses each reaches trained alone, to rounding; and the same stack again gives the
    same bits."""
    cfgs = [TrainConfig(steps=5, batch_size=6, warmup_steps=2, seed=s) for s in (0, 0, 3)]
    data = images(20).double()
    sets = [data[:12], data[6:18], data[::2][:10]]
    torch.set_default_dtype(torch.float64)
    try:
        fn = lambda: build_model(MODEL, SHAPE)  # noqa: E731
        stack = train_stack(fn, sets, SCHEDULE, cfgs, progress=False)
        again = train_stack(fn, sets, SCHEDULE, cfgs, progress=False)
        alone = [
            train_ddpm(fn, x, SCHEDULE, c, progress=False) for x, c in zip(sets, cfgs, strict=False)
        ]
    finally:
        torch.set_default_dtype(torch.float32)
    for s, a, b in zip(stack, alone, again, strict=False):
        torch.testing.assert_close(flat(s.model), flat(a.model), rtol=0, atol=1e-12)
        torch.testing.assert_close(flat(s.ema_model), flat(a.ema_model), rtol=0, atol=1e-12)
        assert s.losses == pytest.approx(a.losses, rel=1e-12)
        assert torch.equal(flat(s.ema_model), flat(b.ema_model)) and s.losses == b.losses
    # the two runs with seed 0 start from one initialisation but see other data
    assert not torch.equal(flat(stack[0].model), flat(stack[1].model))


def test_a_stack_refuses_runs_that_cannot_share_a_step():
    fn = lambda: build_model(MODEL, SHAPE)  # noqa: E731
    cfg = TrainConfig(steps=3, batch_size=8, warmup_steps=1)
    with pytest.raises(ValueError, match="every setting but seed"):
        train_stack(fn, [images(), images()], SCHEDULE, [cfg, cfg.model_copy(update={"lr": 0.1})])
    with pytest.raises(ValueError, match=r"batch sizes \[5, 8\]"):
        train_stack(fn, [images(), images(5)], SCHEDULE, [cfg, cfg])
    with pytest.raises(ValueError, match="2 image sets for 1 configs"):
        train_stack(fn, [images(), images()], SCHEDULE, [cfg])
