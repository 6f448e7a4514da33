"""LoRA fine-tuning (:mod:`diffusion_attribution.diffusion.lora`): K-FAC over the LoRA weights
against the exact GGN restricted to them where K-FAC is exact, influence over the LoRA weights
against exact retraining of a quadratic case, the merged model, the fine-tuning loop
(only the adapters move, resumption) and the LoRA retraining job."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import pearsonr
from torch import nn

from diffusion_attribution.attribution.influence import attribute
from diffusion_attribution.attribution.scores import ScoreKey
from diffusion_attribution.core.sections import DiffusionConfig, ModelConfig, TrainConfig
from diffusion_attribution.curvature.fit import fit_kfac
from diffusion_attribution.diffusion import lora
from diffusion_attribution.diffusion.datasets import ImageDataset
from diffusion_attribution.diffusion.ddpm import NoiseSchedule
from diffusion_attribution.diffusion.measurements import DiffusionLoss
from diffusion_attribution.diffusion.training import build_model, load_model, save_model
from diffusion_attribution.evaluation.lora_retraining import lora_spec, run_lora_stack
from diffusion_attribution.evaluation.retraining import make_job, run_jobs
from tests.curvature.oracles import (
    SCHEDULE,
    LinearEps,
    MLPEps,
    assert_close,
    block_diag_mask,
    brute_ggn,
    draws,
    make,
)
from tests.helpers import TINY_4X4

F64 = torch.float64
MODEL = ModelConfig(
    base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), norm_groups=4
)
SHAPE = (1, 8, 8)
DIGITS_SCHEDULE = NoiseSchedule.linear(100, 1e-3, 0.2)


def adapted(model: nn.Module, rank: int = 2, seed: int = 0) -> nn.Module:
    """``model`` with LoRA and a random (non-zero) ``B``, so that every LoRA weight has a
    gradient."""
    torch.manual_seed(seed)
    model = lora.add_lora(model, rank, float(rank))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_lora_parameters_are_the_adapters_only():
    model = adapted(make(MLPEps))
    names = {id(p): n for n, p in model.named_parameters()}
    params = lora.lora_parameters(model)
    assert params and all(".lora_A." in names[id(p)] or ".lora_B." in names[id(p)] for p in params)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all("base_layer" in n for n in frozen)
    assert all(p.dtype == F64 for p in params)  # the adapters take the base's dtype
    with pytest.raises(ValueError, match="no trainable LoRA weights"):
        lora.lora_parameters(make(MLPEps).requires_grad_(False))


@pytest.mark.parametrize("model_cls", [LinearEps, MLPEps])
def test_kfac_over_lora_weights_is_the_exact_ggn_block_where_kfac_is_exact(model_cls):
    """One example, one draw, no weight sharing: each K-FAC block over a LoRA factor (A and B
    of every adapted Linear) equals that block of the GGN over the LoRA weights alone; the
    blocks between A and B, which K-FAC drops, are not zero in the GGN."""
    model = adapted(make(model_cls), seed=1)
    params = lora.lora_parameters(model)
    x0, t, eps = draws(1, 1, seed=3)
    K = fit_kfac(model, params, SCHEDULE, x0, t, eps, fisher="type2")
    assert K.num_params == sum(p.numel() for p in params)
    ggn, dense = brute_ggn(model, params, x0, t, eps), K.to_dense()
    mask = block_diag_mask(K)
    assert_close(dense[mask], ggn[mask])
    assert torch.all(dense[~mask] == 0) and ggn[~mask].abs().max() > 1e-6


class LoraLinearEps(nn.Module):
    """eps_theta(x_t) = W0 x_t + b0 + B (A x_t) with W0, b0 and A fixed: linear in the trainable
    ``B``, so the diffusion loss is quadratic in the LoRA weights and exact retraining is a
    least-squares solve."""

    def __init__(self, d: int = 4, rank: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d, d).double()
        lora.add_lora(self, rank, float(rank))
        self.lin.lora_A["default"].weight.requires_grad_(False)

    def forward(self, x, t):
        return self.lin(x.flatten(1)).reshape(x.shape)


def _noisy(x0, drawn):
    ab = SCHEDULE.alpha_bars[drawn["t"]].to(F64)[..., None, None, None]
    return (ab.sqrt() * x0[:, None] + (1 - ab).sqrt() * drawn["eps"]).flatten(2)  # (N, S, d)


def _fit_b(model, xt, eps):
    """Set B to the least-squares minimiser of the loss on rows (x_t, eps)."""
    lin = model.lin
    with torch.no_grad():
        base = lin.base_layer(xt)
        z = xt @ lin.lora_A["default"].weight.T * lin.scaling["default"]
        sol = torch.linalg.lstsq(z, eps - base).solution  # (r, d)
        lin.lora_B["default"].weight.copy_(sol.T)
    return model


def test_lora_influence_predicts_exact_lora_retraining_of_a_quadratic_case():
    """score[q, j] ~ m(B_{-j}, x_q) - m(B, x_q): K-FAC influence over the LoRA weights (type-2,
    exact for the one trained Linear) against re-fitting the adapter without example j, the
    base frozen -- the LoRA profile's ground truth in miniature."""
    g = torch.Generator().manual_seed(0)
    n, s = 120, 8
    x0 = torch.randn(n, 1, 2, 2, generator=g, dtype=F64)
    queries = torch.randn(3, 1, 2, 2, generator=g, dtype=F64)
    loss = DiffusionLoss(SCHEDULE)
    drawn = loss.draw(x0, torch.arange(n), s, seed=1)
    xt, eps = _noisy(x0, drawn), drawn["eps"].flatten(2)
    model = _fit_b(LoraLinearEps(), xt.reshape(-1, 4), eps.reshape(-1, 4))
    params = lora.lora_parameters(model)
    assert [p.shape for p in params] == [torch.Size([4, 2])]  # B only
    K = fit_kfac(model, params, SCHEDULE, x0, drawn["t"], drawn["eps"], fisher="type2")
    key = ScoreKey("kfac", "loss", "exact", 1e-12, "none")
    scores, _ = attribute(
        model, params, x0, queries, {"loss": loss}, {"exact": K}, [key], train_measurement=loss,
        train_draws=s, query_draws=16, seed=1, batch_size=7,
    )  # fmt: skip
    score = scores[key].double()
    qdraws = loss.draw(queries, torch.arange(3), 16, seed=2)  # attribute uses seed + 1
    with torch.no_grad():
        full = loss(model, queries, qdraws)
        actual = torch.zeros(3, n, dtype=F64)
        for j in range(n):
            keep = torch.arange(n) != j
            refit = _fit_b(copy.deepcopy(model), xt[keep].reshape(-1, 4), eps[keep].reshape(-1, 4))
            actual[:, j] = loss(refit, queries, qdraws) - full
    for q in range(3):
        assert pearsonr(score[q], actual[q]).statistic > 0.99
        slope = float((score[q] @ actual[q]) / (score[q] @ score[q]))
        assert 0.85 < slope < 1.2, slope


def test_merged_unet_computes_the_adapted_model(tiny_unet):
    """Folding ``(alpha / r) B A`` into each base weight gives a plain U-Net computing the
    adapted model (float64, to round-off), which differs from the base."""
    base = copy.deepcopy(tiny_unet)
    model = adapted(tiny_unet, rank=3)
    x, t = torch.randn(4, 1, 4, 4, dtype=F64), torch.tensor([1, 3, 7, 10])
    cfg = ModelConfig(**{k: getattr(TINY_4X4, k) for k in ModelConfig.model_fields})
    merged = lora.merged_unet(model, cfg, (1, 4, 4))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert_close(merged(x, t), model(x, t), rtol=1e-12)
        assert (merged(x, t) - base(x, t)).abs().max() > 1e-3


def images(n=12, seed=0):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


CFG = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=3, seed=7)


def base_model():
    torch.manual_seed(0)
    return build_model(MODEL, SHAPE)


def finetune(base, **kw):
    return lora.finetune_lora(
        base, images(), DIGITS_SCHEDULE, CFG, rank=2, alpha=2.0, progress=False, **kw
    )


def test_finetune_moves_only_the_adapters_and_is_deterministic(one_thread):
    base = base_model()
    before = copy.deepcopy(base.state_dict())
    a, b = finetune(base), finetune(base)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # base untouched
    state = a.ema_model.state_dict()
    for k, v in before.items():  # every base weight, in the adapted model too
        assert torch.equal(
            state[k.replace("weight", "base_layer.weight").replace("bias", "base_layer.bias")]
            if k not in state
            else state[k],
            v,
        )
    moved = [n for n, p in a.ema_model.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert moved  # B starts at zero and has been trained
    for p, q in zip(a.ema_model.parameters(), b.ema_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert len(a.losses) == CFG.steps


def test_interrupted_finetune_resumes_to_the_same_weights(tmp_path, monkeypatch, one_thread):
    base = base_model()
    whole = finetune(base)
    ckpt = tmp_path / "lora.ckpt"
    real_save = lora.atomic_save

    def save_then_stop(obj, path, **kw):
        real_save(obj, path, **kw)
        raise KeyboardInterrupt  # killed right after the first checkpoint (step 3 of 6)

    monkeypatch.setattr(lora, "atomic_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        finetune(base, checkpoint_path=ckpt)
    monkeypatch.setattr(lora, "atomic_save", real_save)
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    resumed = finetune(base, checkpoint_path=ckpt)
    for p, q in zip(whole.ema_model.parameters(), resumed.ema_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed.losses == whole.losses


def test_save_and_load_lora_round_trip(tmp_path):
    model = finetune(base_model()).ema_model
    lora.save_lora(tmp_path / "lora.pt", model, MODEL, SHAPE, 2, 2.0)
    loaded, params = lora.load_attributed(tmp_path / "absent.pt", tmp_path / "lora.pt")
    x, t = images(3), torch.tensor([1, 50, 100])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
    assert [p.shape for p in params] == [p.shape for p in lora.lora_parameters(model)]


def test_lora_retraining_job_is_the_fine_tuning_on_its_subset(tmp_path, one_thread):
    """A LoRA job fine-tunes the saved base on its subset with its seed: on the whole set with
    the fine-tuning's seed it reproduces the fine-tuned model (merged) bit for bit; its name
    changes with the base's content."""
    base = base_model()
    save_model(tmp_path / "base.pt", base, MODEL, SHAPE)
    data = ImageDataset(images(), torch.zeros(12, dtype=torch.int64), "digits10", ("5",))
    data.save(tmp_path / "train.pt")
    spec = lora_spec(tmp_path / "base.pt", 2, 2.0)
    diffusion = DiffusionConfig(num_timesteps=100, beta_start=1e-3, beta_end=0.2)
    job = make_job(
        "all", tmp_path / "train.pt", range(12), CFG.seed, MODEL, diffusion, CFG, tmp_path,
        lora=spec,
    )  # fmt: skip
    plain = make_job(
        "all", tmp_path / "train.pt", range(12), CFG.seed, MODEL, diffusion, CFG, tmp_path
    )
    assert job.output != plain.output and plain.lora is None
    run_jobs([job], executor="inline", progress=False, runner=run_lora_stack)
    expected = lora.merged_unet(finetune(base).ema_model, MODEL, SHAPE)
    got = load_model(job.output)
    for (n, p), q in zip(expected.state_dict().items(), got.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    save_model(tmp_path / "base.pt", base_model().requires_grad_(False).eval(), MODEL, SHAPE)
    other = lora_spec(tmp_path / "base.pt", 2, 2.0)
    assert other == spec  # the same base, saved again: the same name
