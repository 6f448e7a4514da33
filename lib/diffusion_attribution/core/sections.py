"""The sections of ``params.yaml``, one typed pydantic model per phase that reads it.

Each section (:class:`DataConfig`, :class:`ModelConfig`, ..., :class:`CounterfactualConfig`)
forbids unknown keys, is frozen and rejects NaN and Inf; its defaults are the defaults of the
experiment (written here once). A section checks its own keys against each other; the
checks across sections, against the training set's size and image size (:data:`TRAIN_SIZES`,
:data:`IMAGE_SIZES`), and the loading of a file are :mod:`diffusion_attribution.core.config`'s.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)


def _not_bool(v: object) -> object:
    """YAML reads ``yes`` / ``true`` as a bool; a number field must not take it as 1."""
    if isinstance(v, bool):
        raise ValueError(f"Input should be a number, not a boolean ({v})")
    return v


def _nonempty(v: tuple) -> tuple:
    if not v:
        raise ValueError("must list at least one entry")
    return v


def _distinct(v: tuple) -> tuple:
    seen = [x for i, x in enumerate(v) if x in v[:i]]
    if seen:
        raise ValueError(f"entries must be distinct, {seen[0]!r} is given twice")
    return v


# Integers are strict (no bools, no 2.5, no "10"); floats accept ints and YAML's "1e-3"
# (PyYAML reads exponents without a dot as strings) but no bools; neither accepts NaN or Inf.
PositiveInt = Annotated[int, Field(strict=True, gt=0)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
#: Seeds fit torch's generators (and leave room for the offsets added to them).
Seed = Annotated[int, Field(strict=True, ge=0, lt=2**62)]
Float = Annotated[float, BeforeValidator(_not_bool)]
PositiveFloat = Annotated[Float, Field(gt=0)]
Probability = Annotated[Float, Field(ge=0, lt=1)]
UnitInterval = Annotated[Float, Field(gt=0, lt=1)]

#: Training-set size of each dataset (digits2: the two classes' counts in scikit-learn's
#: digits, :data:`DIGIT_COUNTS`; cifar2: ``data.cifar2_size``); a test checks them.
DIGIT_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
TRAIN_SIZES = {"digits10": sum(DIGIT_COUNTS), "cifar10": 50000}
#: Side length of each dataset's square images.
IMAGE_SIZES = {"digits2": 8, "digits10": 8, "cifar2": 32, "cifar10": 32}
#: Images per class in CIFAR-10's training set (the most CIFAR-2 can draw from each).
CIFAR_PER_CLASS = 5000


class Section(BaseModel):
    """A section of ``params.yaml``: no unknown key, frozen, finite numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(Section):
    """Training set (App. G.1). digits2/digits10 are the CPU analogues of CIFAR-2/CIFAR-10."""

    dataset: Literal["digits2", "digits10", "cifar2", "cifar10"] = "digits2"
    digits_classes: tuple[Annotated[int, Field(ge=0, le=9)], ...] = (3, 8)
    cifar_archive: str = "data/cifar-10-binary.tar.gz"
    cifar2_size: PositiveInt = 5000
    seed: Seed = 0

    @model_validator(mode="after")
    def _check_classes(self) -> DataConfig:
        if self.dataset == "digits2" and len(set(self.digits_classes)) != 2:
            raise ValueError(
                f"data.digits_classes: digits2 needs exactly two distinct classes in 0..9, "
                f"got {list(self.digits_classes)}"
            )
        if self.dataset == "cifar2" and (
            self.cifar2_size % 2 or self.cifar2_size > 2 * CIFAR_PER_CLASS
        ):
            raise ValueError(
                f"data.cifar2_size: {self.cifar2_size} must be even (an even class split) and "
                f"at most {2 * CIFAR_PER_CLASS} (CIFAR-10 has {CIFAR_PER_CLASS} per class)"
            )
        return self

    @property
    def num_train(self) -> int:
        """Size of the training set these settings give."""
        if self.dataset == "digits2":
            return sum(DIGIT_COUNTS[c] for c in set(self.digits_classes))
        if self.dataset == "cifar2":
            return self.cifar2_size
        return TRAIN_SIZES[self.dataset]


class ModelConfig(Section):
    """U-Net of :mod:`diffusion_attribution.diffusion.unet` (App. G.2)."""

    base_channels: PositiveInt = 16
    channel_mults: tuple[PositiveInt, ...] = (1, 2)
    num_res_blocks: PositiveInt = 1
    attn_resolutions: tuple[PositiveInt, ...] = (4,)
    dropout: Probability = 0.0
    norm_groups: PositiveInt = 8


class DiffusionConfig(Section):
    """Noise schedule and reverse-process variance (Sec. 2.1; Ho et al. 2020)."""

    num_timesteps: PositiveInt = 1000
    beta_start: UnitInterval = 1e-4
    beta_end: UnitInterval = 0.02
    variance: Literal["fixed_large", "fixed_small"] = "fixed_large"

    @model_validator(mode="after")
    def _check_betas(self) -> DiffusionConfig:
        if self.beta_start > self.beta_end:
            raise ValueError(
                f"diffusion.beta_start: {self.beta_start:g} must not exceed diffusion.beta_end "
                f"= {self.beta_end:g}"
            )
        return self


class TrainConfig(Section):
    """Training of the full model (App. G.5): AdamW, linear warm-up then cosine, EMA."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    warmup_steps: NonNegInt = 100
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    grad_clip: PositiveFloat = 1.0
    ema_decay: Probability = 0.995
    checkpoint_every: PositiveInt = 500
    seed: Seed = 0

    @model_validator(mode="after")
    def _check_warmup(self) -> TrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"train.warmup_steps: {self.warmup_steps} must be smaller than steps "
                f"(train.steps = {self.steps})"
            )
        return self


class SampleConfig(Section):
    """Generated samples whose training-data attribution is studied (App. G.2, 'Sampling')."""

    num_samples: PositiveInt = 64
    batch_size: PositiveInt = 64
    seed: Seed = 1


KFACVariant = Literal[
    "mc_expand",
    "mc_reduce",
    "empirical_expand",
    "empirical_reduce",
    "example_expand",
    "example_reduce",
    "ekfac_mc_expand",
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


class CurvatureConfig(Section):
    """K-FAC of GGN^model (MC Fisher, eqs. 10, 12) or GGN^loss (empirical Fisher, eq. 11), Sec. 3.1.

    ``mc_expand`` is the paper's method; the other Fisher / expand-reduce combinations are the
    ablation of Fig. 4; ``ekfac_mc_expand`` is the paper's method with EK-FAC's eigenvalue
    correction (George et al., 2018), which the paper's code supports. ``empirical_*`` is the
    empirical Fisher of each (t, eps) draw's gradient, as the authors' code forms it;
    ``example_*`` is eq. 11 as the paper writes it, the outer product of each example's
    gradient of its loss averaged over its draws
    (:func:`~diffusion_attribution.curvature.hooks.draw_mean`).
    """

    variants: Annotated[
        tuple[KFACVariant, ...], AfterValidator(_nonempty), AfterValidator(_distinct)
    ] = (
        "mc_expand",
        "mc_reduce",
        "empirical_expand",
        "empirical_reduce",
        "example_expand",
        "ekfac_mc_expand",
    )
    num_draws: PositiveInt = 8
    batch_size: PositiveInt = 512
    seed: Seed = 2
    #: dtype of the eigendecompositions and of the saved eigenbases: float32 halves the
    #: curvature's memory and its eigh time (the paper-scale profiles); what it moves in the
    #: scores is measured in tests/curvature/test_precision.py
    precision: Literal["float64", "float32"] = "float64"


class InfluenceConfig(Section):
    """K-FAC influence scores (eq. 6) for the generated samples (Sec. 3.2, 3.3, App. C)."""

    train_draws: PositiveInt = 256
    query_draws: PositiveInt = 256
    timesteps: Annotated[tuple[PositiveInt, ...], AfterValidator(_distinct)] = (
        10,
        100,
        250,
        500,
        750,
    )
    ablation_measurements: Annotated[tuple[str, ...], AfterValidator(_distinct)] = (
        "loss",
        "elbo",
    )
    damping: PositiveFloat = 1e-8
    damping_sweep: Annotated[
        tuple[PositiveFloat, ...], AfterValidator(_nonempty), AfterValidator(_distinct)
    ] = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    compression: Literal["int8", "int4", "none"] = "int8"
    svd_ranks: Annotated[tuple[PositiveInt, ...], AfterValidator(_distinct)] = (1, 4, 16)
    batch_size: PositiveInt = 16
    seed: Seed = 3


class TrakConfig(Section):
    """TRAK / D-TRAK (Sec. 4, App. G.3.1) and similarity baselines.

    Random projection to ``projection_dim`` (the paper uses 32768; 2048 here keeps the default
    profile within minutes on a CPU and is what the pilot used). Dampings are relative to the
    mean eigenvalue of the projected empirical Fisher; both float32 and float16 features are
    scored (Fig. 18). Draw counts and seeds are those of ``influence``, so TRAK and K-FAC see
    the same (t, eps) draws.
    """

    projection_dim: PositiveInt = 2048
    projection: Literal["rademacher", "gaussian"] = "rademacher"
    relative_dampings: Annotated[
        tuple[PositiveFloat, ...], AfterValidator(_nonempty), AfterValidator(_distinct)
    ] = (
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
    query_measurements: Annotated[
        tuple[str, ...], AfterValidator(_nonempty), AfterValidator(_distinct)
    ] = ("loss", "elbo", "trajectory", "journey")
    seed: Seed = 4


class RetrainConfig(Section):
    """Ground truth for the LDS (eq. 13, App. G.4): models retrained on random subsets.

    ``num_subsets`` (M) subsets, each a ``fraction`` of the training set drawn without
    replacement from ``seed``, and ``num_seeds`` (K) training seeds per subset: seeds
    ``first_seed, ..., first_seed + K - 1``, disjoint from the full model's ``train.seed``.
    Seed k is the same for every subset ("shared seeds", common random numbers in training,
    :mod:`diffusion_attribution.evaluation.retraining`). Every other training setting is
    ``train``'s, and ``steps`` is the full model's scaled by ``fraction`` (App. G.5: half the
    steps on half the data, the same number of epochs, :func:`epoch_matched_steps`);
    ``epoch_matched: false`` is the explicit override for a run that deviates from it on
    purpose. As a sensitivity check, the first
    ``independent_subsets`` subsets also get one model each with a seed of its own (no seed
    shared with any other model), against which the LDS is reported too.

    ``stack_size``: how many models (subset models here, removal models in the counterfactual
    stage) are trained together in one batched computation
    (:func:`~diffusion_attribution.diffusion.training.train_stack`): each is trained exactly as
    if alone, in far less time on a CPU; the size is part of each model's identity, because
    the grouped convolutions round differently for different sizes. 1 trains every model
    alone (the natural choice on a GPU, where one model already fills the device).
    """

    num_subsets: Annotated[int, Field(strict=True, ge=2)] = 32
    fraction: UnitInterval = 0.5
    num_seeds: Annotated[int, Field(strict=True, ge=2)] = 3
    first_seed: Seed = 100
    steps: PositiveInt = 500
    epoch_matched: bool = True
    independent_subsets: NonNegInt = 8
    stack_size: PositiveInt = 8
    seed: Seed = 5

    @property
    def seeds(self) -> tuple[int, ...]:
        """The K shared training seeds of the subset models."""
        return tuple(range(self.first_seed, self.first_seed + self.num_seeds))

    @property
    def independent_seeds(self) -> tuple[int, ...]:
        """One training seed per subset of the independent-seed sensitivity check."""
        start = self.first_seed + self.num_seeds
        return tuple(range(start, start + self.independent_subsets))


def epoch_matched_steps(full_steps: int, fraction: float) -> int:
    """Steps of a model on a ``fraction`` of the data that sees each of its examples as often
    as the full model of ``full_steps`` steps sees each of its own (App. G.5)."""
    return max(1, round(full_steps * fraction))


class MeasureConfig(Section):
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
    seed: Seed = 6


class ProtocolConfig(Section):
    """Two budget deviations measured on the run's own ground truth (App. G.3.1; the
    ``protocol`` stage).

    ``fit_draws``: (t, eps) draws per training example of the K-FAC fit (MC Fisher, expand),
    against ``curvature.num_draws`` (the paper's code: 125-250); ``projection_dims``: TRAK's
    and D-TRAK's projection dimension, against ``trak.projection_dim`` (the paper: 32768).
    Every other setting is the ``curvature``, ``influence`` and ``trak`` sections'. The
    configured value is always computed as well, so that each value's paired difference
    against it is defined. An empty tuple skips that measurement (its metrics say so).
    """

    fit_draws: Annotated[tuple[PositiveInt, ...], AfterValidator(_distinct)] = (8, 32, 128)
    projection_dims: Annotated[tuple[PositiveInt, ...], AfterValidator(_distinct)] = (
        2048,
        8192,
        32768,
    )


CounterfactualMethod = Literal[
    "kfac", "trak", "d-trak", "das", "journey-trak", "feature_cos", "random"
]


class CounterfactualConfig(Section):
    """Retraining without the top influences (Fig. 3, App. G.6).

    For each of the first ``num_queries`` samples (the paper: 5) and each method, the
    ``fractions`` of the training set with the largest scores for that sample's loss are
    removed and a model is retrained "using the same procedure as training on the full dataset
    (with the same number of training steps)": ``train``'s settings, steps and seed. The change
    in the sample's loss is taken relative to the full model itself, so with the same seed
    (common random numbers) it isolates the removed data. ``random`` removes one set of random
    examples per fraction, drawn from ``seed``, for all samples (the control). TRAK and D-TRAK
    use their best damping on the loss LDS benchmark, as in the paper. Beyond the paper:
    ``das`` (:mod:`~diffusion_attribution.attribution.das`, its best damping),
    ``journey-trak`` (TRAK of :class:`~diffusion_attribution.diffusion.measurements.JourneyLoss`,
    its best damping too) and ``feature_cos`` (the U-Net feature nearest neighbours), in the
    default profile.
    """

    fractions: Annotated[
        tuple[UnitInterval, ...], AfterValidator(_nonempty), AfterValidator(_distinct)
    ] = (
        0.02,
        0.1,
    )
    num_queries: PositiveInt = 5
    methods: Annotated[
        tuple[CounterfactualMethod, ...], AfterValidator(_nonempty), AfterValidator(_distinct)
    ] = ("kfac", "trak", "d-trak", "das", "journey-trak", "feature_cos", "random")
    seed: Seed = 0


class FinetuneConfig(Section):
    """LoRA fine-tuning (beyond the paper; :mod:`~diffusion_attribution.diffusion.lora`).

    A base model is trained with ``base`` on every digit of ``base_classes``; the training set
    being attributed is ``size`` images of ``classes`` (an equal, seeded draw per class), to
    which the base is adapted with rank-``rank`` LoRA of scale ``alpha / rank`` on every
    Linear / Conv2d layer, with ``train``'s settings. Retraining (the LDS subsets and the
    counterfactual) re-runs only the fine-tuning, from the same base.
    """

    base_classes: Annotated[
        tuple[Annotated[int, Field(ge=0, le=9)], ...],
        AfterValidator(_nonempty),
        AfterValidator(_distinct),
    ] = (0, 1, 2, 3, 4)
    classes: Annotated[
        tuple[Annotated[int, Field(ge=0, le=9)], ...],
        AfterValidator(_nonempty),
        AfterValidator(_distinct),
    ] = (5, 6, 7, 8, 9)
    size: PositiveInt = 200
    rank: PositiveInt = 4
    alpha: PositiveFloat = 4.0
    base: TrainConfig = TrainConfig()
    seed: Seed = 0

    @model_validator(mode="after")
    def _check_classes(self) -> FinetuneConfig:
        shared = sorted(set(self.base_classes) & set(self.classes))
        if shared:
            raise ValueError(
                f"finetune.classes: {shared} are also in finetune.base_classes; the fine-tuning "
                "set must be data the base model has not seen"
            )
        if self.size % len(self.classes):
            raise ValueError(
                f"finetune.size: {self.size} is not a multiple of the {len(self.classes)} "
                "classes (an equal draw per class)"
            )
        most = min(DIGIT_COUNTS[c] for c in self.classes) * len(self.classes)
        if self.size > most:
            raise ValueError(
                f"finetune.size: {self.size} exceeds {most}, the most an equal draw from the "
                f"digits of classes {list(self.classes)} can give"
            )
        return self


class ConditionalConfig(Section):
    """A class-conditional model with classifier-free guidance (beyond the paper;
    :mod:`~diffusion_attribution.diffusion.conditional`).

    The U-Net gets each image's class through a class embedding; training drops the class
    to the null class with probability ``p_uncond``; the generated samples cycle through the
    classes (sample ``i`` is of class ``i mod K``) and are drawn with guidance weight
    ``guidance`` (eq. 6 of Ho & Salimans, 2022; 0 is the plain conditional model). Every
    measurement of a sample is taken under the conditional model of its class, unguided.
    """

    p_uncond: Probability = 0.1
    guidance: Annotated[Float, Field(ge=0)] = 1.0
