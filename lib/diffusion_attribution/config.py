"""Typed schema of ``params.yaml``: the one source of experiment settings and their defaults.

Every profile in ``configs/`` has the same keys. :func:`load_config` validates a file and
raises :class:`ConfigError` with one line per problem, each naming the offending key, e.g.
``train.steps: Input should be greater than 0 (got -5)``. The command-line entry
``python -m diffusion_attribution.config params.yaml`` prints that message without a
traceback and exits with status 2, before anything is computed.

Where a job runs (CPU or GPU, local processes or SLURM) is an execution setting, not an
experiment setting: it lives in environment variables (see :mod:`diffusion_attribution.pipeline`),
so moving to a cluster does not invalidate results.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Training set (App. G.1). digits2/digits10 are the CPU analogues of CIFAR-2/CIFAR-10."""

    dataset: Literal["digits2", "digits10", "cifar2", "cifar10"] = "digits2"
    digits_classes: tuple[Annotated[int, Field(ge=0, le=9)], ...] = (3, 8)
    cifar_archive: str = "data/cifar-10-binary.tar.gz"
    cifar2_size: PositiveInt = 5000
    seed: NonNegInt = 0

    @model_validator(mode="after")
    def _check_classes(self) -> DataConfig:
        if self.dataset == "digits2" and len(set(self.digits_classes)) != 2:
            raise ValueError("digits_classes: digits2 needs exactly two distinct classes")
        return self


class ModelConfig(_Section):
    """U-Net of :mod:`diffusion_attribution.unet` (App. G.2)."""

    base_channels: PositiveInt = 16
    channel_mults: tuple[PositiveInt, ...] = (1, 2)
    num_res_blocks: PositiveInt = 1
    attn_resolutions: tuple[PositiveInt, ...] = (4,)
    dropout: Probability = 0.0
    norm_groups: PositiveInt = 8


class DiffusionConfig(_Section):
    """Noise schedule and reverse-process variance (Sec. 2.1; Ho et al. 2020)."""

    num_timesteps: PositiveInt = 1000
    beta_start: Annotated[float, Field(gt=0, lt=1)] = 1e-4
    beta_end: Annotated[float, Field(gt=0, lt=1)] = 0.02
    variance: Literal["fixed_large", "fixed_small"] = "fixed_large"

    @model_validator(mode="after")
    def _check_betas(self) -> DiffusionConfig:
        if self.beta_start > self.beta_end:
            raise ValueError("beta_start: must not exceed beta_end")
        return self


class TrainConfig(_Section):
    """Training of the full model (App. G.5): AdamW, linear warm-up then cosine, EMA."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    warmup_steps: NonNegInt = 100
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: PositiveFloat = 1.0
    ema_decay: Probability = 0.995
    checkpoint_every: PositiveInt = 500
    seed: NonNegInt = 0

    @model_validator(mode="after")
    def _check_warmup(self) -> TrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError("warmup_steps: must be smaller than steps")
        return self


class SampleConfig(_Section):
    """Generated samples whose training-data attribution is studied (App. G.2, 'Sampling')."""

    num_samples: PositiveInt = 64
    batch_size: PositiveInt = 64
    seed: NonNegInt = 1


KFACVariant = Literal[
    "mc_expand", "mc_reduce", "empirical_expand", "empirical_reduce", "ekfac_mc_expand"
]


#: The paper's recommended variant (MC Fisher, K-FAC expand).
MAIN_VARIANT: KFACVariant = "mc_expand"


def parse_variant(variant: str) -> tuple[str, str, bool]:
    """``(fisher, kfac, ekfac)`` of a variant name, e.g. ``"ekfac_mc_expand"`` ->
    ``("mc", "expand", True)``."""
    ekfac = variant.startswith("ekfac_")
    fisher, kfac = variant.removeprefix("ekfac_").split("_")
    return fisher, kfac, ekfac


def main_variant(variants: tuple[str, ...]) -> str:
    """The variant whose scores stand for K-FAC influence: the paper's (:data:`MAIN_VARIANT`)
    when it is fitted, else the first one."""
    return MAIN_VARIANT if MAIN_VARIANT in variants else variants[0]


class CurvatureConfig(_Section):
    """K-FAC of GGN^model (MC Fisher, eqs. 10, 12) or GGN^loss (empirical Fisher, eq. 11), Sec. 3.1.

    ``mc_expand`` is the paper's method; the other Fisher / expand-reduce combinations are the
    ablation of Fig. 4; ``ekfac_mc_expand`` is the paper's method with EK-FAC's eigenvalue
    correction (George et al., 2018), which the paper's code supports.
    """

    variants: tuple[KFACVariant, ...] = (
        "mc_expand",
        "mc_reduce",
        "empirical_expand",
        "empirical_reduce",
        "ekfac_mc_expand",
    )
    num_draws: PositiveInt = 8
    batch_size: PositiveInt = 512
    seed: NonNegInt = 2


class InfluenceConfig(_Section):
    """K-FAC influence scores (eq. 6) for the generated samples (Sec. 3.2, 3.3, App. C)."""

    train_draws: PositiveInt = 256
    query_draws: PositiveInt = 256
    timesteps: tuple[PositiveInt, ...] = (10, 100, 250, 500, 750)
    ablation_measurements: tuple[str, ...] = ("loss", "elbo")
    damping: PositiveFloat = 1e-8
    damping_sweep: tuple[PositiveFloat, ...] = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    compression: Literal["int8", "int4", "none"] = "int8"
    svd_ranks: tuple[PositiveInt, ...] = (1, 4, 16)
    batch_size: PositiveInt = 16
    seed: NonNegInt = 3


class TrakConfig(_Section):
    """TRAK / D-TRAK (Sec. 4, App. G.3.1) and similarity baselines.

    Random projection to ``projection_dim`` (the paper uses 32768; 2048 here keeps the default
    profile within minutes on a CPU and is what the pilot used). Dampings are relative to the
    mean eigenvalue of the projected empirical Fisher; both float32 and float16 features are
    scored (Fig. 18). Draw counts and seeds are those of ``influence``, so TRAK and K-FAC see
    the same (t, eps) draws.
    """

    projection_dim: PositiveInt = 2048
    projection: Literal["rademacher", "gaussian"] = "rademacher"
    relative_dampings: tuple[PositiveFloat, ...] = (
        1e-6,
        1e-5,
        1e-4,
        1e-3,
        1e-2,
        1e-1,
        1.0,
        10.0,
        100.0,
        1000.0,
    )
    query_measurements: tuple[str, ...] = ("loss", "elbo", "trajectory")
    seed: NonNegInt = 4


class RetrainConfig(_Section):
    """Ground truth for the LDS (eq. 13, App. G.4): models retrained on random subsets.

    ``num_subsets`` (M) subsets, each a ``fraction`` of the training set drawn without
    replacement from ``seed``, and ``num_seeds`` (K) training seeds per subset: seeds
    ``first_seed, ..., first_seed + K - 1``, disjoint from the full model's ``train.seed``.
    Seed k is the same for every subset ("shared seeds", common random numbers in training,
    :mod:`diffusion_attribution.retrain`). Every other training setting is ``train``'s, and
    ``steps`` is the full model's scaled by ``fraction`` (App. G.5: half the steps on half the
    data, the same number of epochs); ``epoch_matched: false`` is the explicit override for a
    run that deviates from it on purpose. As a sensitivity check, the first
    ``independent_subsets`` subsets also get one model each with a seed of its own (no seed
    shared with any other model), against which the LDS is reported too.
    """

    num_subsets: Annotated[int, Field(ge=2)] = 32
    fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5
    num_seeds: Annotated[int, Field(ge=2)] = 3
    first_seed: NonNegInt = 100
    steps: PositiveInt = 500
    epoch_matched: bool = True
    independent_subsets: NonNegInt = 8
    seed: NonNegInt = 5

    @property
    def seeds(self) -> tuple[int, ...]:
        """The K shared training seeds of the subset models."""
        return tuple(range(self.first_seed, self.first_seed + self.num_seeds))

    @property
    def independent_seeds(self) -> tuple[int, ...]:
        """One training seed per subset of the independent-seed sensitivity check."""
        start = self.first_seed + self.num_seeds
        return tuple(range(start, start + self.independent_subsets))


class MeasureConfig(_Section):
    """Ground-truth measurements on every retrained model (Sec. 4; App. G.4).

    The first ``num_queries`` generated samples are measured with the loss, the ELBO and the
    trajectory log-probability from ``draws`` pre-drawn (t, eps) per sample, and with l_t at
    each of ``influence.timesteps`` from ``timestep_draws`` eps per sample; the same draws for
    every model (common random numbers), from ``seed``.
    """

    num_queries: PositiveInt = 32
    draws: PositiveInt = 256
    timestep_draws: PositiveInt = 64
    batch_size: PositiveInt = 1024
    seed: NonNegInt = 6


CounterfactualMethod = Literal["kfac", "trak", "d-trak", "random"]


class CounterfactualConfig(_Section):
    """Retraining without the top influences (Fig. 3, App. G.6).

    For each of the first ``num_queries`` samples (the paper: 5) and each method, the
    ``fractions`` of the training set with the largest scores for that sample's loss are
    removed and a model is retrained "using the same procedure as training on the full dataset
    (with the same number of training steps)": ``train``'s settings, steps and seed. The change
    in the sample's loss is taken relative to the full model itself, so with the same seed
    (common random numbers) it isolates the removed data. ``random`` removes one set of random
    examples per fraction, drawn from ``seed``, for all samples (the control). TRAK and D-TRAK use their best damping on the loss LDS
    benchmark, as in the paper.
    """

    fractions: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = (0.02, 0.1)
    num_queries: PositiveInt = 5
    methods: tuple[CounterfactualMethod, ...] = ("kfac", "trak", "d-trak", "random")
    seed: NonNegInt = 0


class Config(_Section):
    """The whole of ``params.yaml``."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    curvature: CurvatureConfig = CurvatureConfig()
    influence: InfluenceConfig = InfluenceConfig()
    trak: TrakConfig = TrakConfig()
    retrain: RetrainConfig = RetrainConfig()
    measure: MeasureConfig = MeasureConfig()
    counterfactual: CounterfactualConfig = CounterfactualConfig()

    @model_validator(mode="after")
    def _check_timesteps(self) -> Config:
        bad = [t for t in self.influence.timesteps if t > self.diffusion.num_timesteps]
        if bad:
            raise ValueError(
                f"influence.timesteps: {bad} exceed diffusion.num_timesteps = {self.diffusion.num_timesteps}"
            )
        names = {"loss", "elbo", "trajectory", "square_norm"} | {
            f"l_t={t}" for t in self.influence.timesteps
        }
        unknown = sorted(set(self.influence.ablation_measurements) - names)
        if unknown:
            raise ValueError(
                f"influence.ablation_measurements: unknown {unknown}; choose from {sorted(names)}"
            )
        return self

    @model_validator(mode="after")
    def _check_evaluation(self) -> Config:
        if self.measure.num_queries > self.sample.num_samples:
            raise ValueError(
                f"measure.num_queries: {self.measure.num_queries} exceeds sample.num_samples = "
                f"{self.sample.num_samples}"
            )
        if self.counterfactual.num_queries > self.measure.num_queries:
            raise ValueError(
                f"counterfactual.num_queries: {self.counterfactual.num_queries} exceeds "
                f"measure.num_queries = {self.measure.num_queries}"
            )
        if self.retrain.steps <= self.train.warmup_steps:
            raise ValueError(
                f"retrain.steps: {self.retrain.steps} must exceed train.warmup_steps = "
                f"{self.train.warmup_steps}"
            )
        r = self.retrain
        if r.independent_subsets == 1 or r.independent_subsets > r.num_subsets:
            raise ValueError(
                f"retrain.independent_subsets: {r.independent_subsets} must be 0 (no sensitivity "
                f"check) or between 2 and retrain.num_subsets = {r.num_subsets}"
            )
        matched = epoch_matched_steps(self.train.steps, self.retrain.fraction)
        if self.retrain.epoch_matched and self.retrain.steps != matched:
            raise ValueError(
                f"retrain.steps: {self.retrain.steps} steps on a {self.retrain.fraction:g} subset "
                f"are not the full model's epochs (train.steps = {self.train.steps}); the "
                f"protocol (App. G.5) needs retrain.steps = {matched}, or set "
                "retrain.epoch_matched: false to deviate on purpose"
            )
        if self.train.seed in self.retrain.seeds + self.retrain.independent_seeds:
            raise ValueError(
                f"retrain.first_seed: the retraining seeds {self.retrain.first_seed}.."
                f"{max(self.retrain.seeds + self.retrain.independent_seeds)} include the full "
                f"model's train.seed = {self.train.seed}; the LDS models must not share it"
            )
        return self


def epoch_matched_steps(full_steps: int, fraction: float) -> int:
    """Steps of a model on a ``fraction`` of the data that sees each of its examples as often
    as the full model of ``full_steps`` steps sees each of its own (App. G.5)."""
    return max(1, round(full_steps * fraction))


class ConfigError(ValueError):
    """Invalid parameters; the message names every offending key."""


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] != "missing" and "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        # cross-section checks name their keys in the message itself
        lines.append(f"  {key}: {msg}" if e["loc"] else f"  {msg}")
    return "\n".join(lines)


def parse_config(raw: object, source: str = "params") -> Config:
    """Validate a mapping (e.g. parsed YAML) against :class:`Config`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid parameters in {source}: expected a mapping at the top level")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate a parameters file; raises :class:`ConfigError` naming bad keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameters file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_config(raw, str(path))


def dump_config(config: Config) -> str:
    """YAML text of a config with every key spelled out (how ``configs/*.yaml`` are written)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_attribution.config [params.yaml]``: validate, print errors, exit 2."""
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "params.yaml"
    try:
        load_config(path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
