"""Typed schema of ``params.yaml``: the one source of experiment settings and their defaults.

Every profile in ``configs/`` has the same keys. :func:`load_config` validates a file and
raises :class:`ConfigError` with one line per problem, each naming the offending key, e.g.
``train.steps: Input should be greater than 0 (got -5)``. The command-line entry
``python -m diffusion_attribution.core.config params.yaml`` prints that message without a
traceback and exits with status 2, before anything is computed; with ``--write PATH`` it
also writes a small marker file (the output of the ``validate`` stage of ``dvc.yaml``, on
which every other stage depends, so that a bad file stops ``dvc repro`` before DVC deletes
any stage's outputs).

A parameters *file* must be complete: every section and every key spelled out (as the
profiles in ``configs/`` are), so that DVC's per-key parameter dependencies see every value;
a missing section or key, a key given twice, an empty file or text that is not YAML is
rejected like a bad value. Numbers must be finite, integers must be integers (not ``true``,
not ``2.5``), and settings are checked against each other and against the training set's size
and image size (:data:`TRAIN_SIZES`, :data:`IMAGE_SIZES`), e.g. a U-Net whose levels or
attention resolutions do not fit the images.

Where a job runs (CPU or GPU, local processes or SLURM) is an execution setting, not an
experiment setting: it lives in environment variables (see :mod:`diffusion_attribution.pipeline.runner`),
so moving to a cluster does not invalidate results.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(_Section):
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


class ModelConfig(_Section):
    """U-Net of :mod:`diffusion_attribution.diffusion.unet` (App. G.2)."""

    base_channels: PositiveInt = 16
    channel_mults: tuple[PositiveInt, ...] = (1, 2)
    num_res_blocks: PositiveInt = 1
    attn_resolutions: tuple[PositiveInt, ...] = (4,)
    dropout: Probability = 0.0
    norm_groups: PositiveInt = 8


class DiffusionConfig(_Section):
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


class TrainConfig(_Section):
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


class SampleConfig(_Section):
    """Generated samples whose training-data attribution is studied (App. G.2, 'Sampling')."""

    num_samples: PositiveInt = 64
    batch_size: PositiveInt = 64
    seed: Seed = 1


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

    variants: Annotated[
        tuple[KFACVariant, ...], AfterValidator(_nonempty), AfterValidator(_distinct)
    ] = (
        "mc_expand",
        "mc_reduce",
        "empirical_expand",
        "empirical_reduce",
        "ekfac_mc_expand",
    )
    num_draws: PositiveInt = 8
    batch_size: PositiveInt = 512
    seed: Seed = 2


class InfluenceConfig(_Section):
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
    ] = ("loss", "elbo", "trajectory")
    seed: Seed = 4


class RetrainConfig(_Section):
    """Ground truth for the LDS (eq. 13, App. G.4): models retrained on random subsets.

    ``num_subsets`` (M) subsets, each a ``fraction`` of the training set drawn without
    replacement from ``seed``, and ``num_seeds`` (K) training seeds per subset: seeds
    ``first_seed, ..., first_seed + K - 1``, disjoint from the full model's ``train.seed``.
    Seed k is the same for every subset ("shared seeds", common random numbers in training,
    :mod:`diffusion_attribution.evaluation.retraining`). Every other training setting is ``train``'s, and
    ``steps`` is the full model's scaled by ``fraction`` (App. G.5: half the steps on half the
    data, the same number of epochs); ``epoch_matched: false`` is the explicit override for a
    run that deviates from it on purpose. As a sensitivity check, the first
    ``independent_subsets`` subsets also get one model each with a seed of its own (no seed
    shared with any other model), against which the LDS is reported too.
    """

    num_subsets: Annotated[int, Field(strict=True, ge=2)] = 32
    fraction: UnitInterval = 0.5
    num_seeds: Annotated[int, Field(strict=True, ge=2)] = 3
    first_seed: Seed = 100
    steps: PositiveInt = 500
    epoch_matched: bool = True
    independent_subsets: NonNegInt = 8
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
    seed: Seed = 6


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

    fractions: Annotated[
        tuple[UnitInterval, ...], AfterValidator(_nonempty), AfterValidator(_distinct)
    ] = (
        0.02,
        0.1,
    )
    num_queries: PositiveInt = 5
    methods: Annotated[
        tuple[CounterfactualMethod, ...], AfterValidator(_nonempty), AfterValidator(_distinct)
    ] = ("kfac", "trak", "d-trak", "random")
    seed: Seed = 0


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
        T = self.diffusion.num_timesteps
        bad = [t for t in self.influence.timesteps if t > T]
        if bad:
            raise ValueError(
                f"influence.timesteps: {bad} exceed diffusion.num_timesteps = {T}; each "
                f"timestep must lie in 1..{T}"
            )
        names = {"loss", "elbo", "trajectory", "square_norm"} | {
            f"l_t={t}" for t in self.influence.timesteps
        }
        for key, given in (
            ("influence.ablation_measurements", self.influence.ablation_measurements),
            ("trak.query_measurements", self.trak.query_measurements),
        ):
            unknown = sorted(set(given) - names)
            if unknown:
                raise ValueError(f"{key}: unknown {unknown}; choose from {sorted(names)}")
        return self

    @model_validator(mode="after")
    def _check_model_fits_images(self) -> Config:
        """The checks the U-Net makes when it is built, made before anything is computed."""
        m, size = self.model, IMAGE_SIZES[self.data.dataset]
        if size % 2 ** (len(m.channel_mults) - 1):
            raise ValueError(
                f"model.channel_mults: {len(m.channel_mults)} levels halve {size}x{size} "
                f"{self.data.dataset} images {len(m.channel_mults) - 1} times; at most "
                f"{int(math.log2(size & -size)) + 1} levels fit"
            )
        widths = [m.base_channels * k for k in m.channel_mults]
        if any(w % m.norm_groups for w in widths):
            raise ValueError(
                f"model.norm_groups: {m.norm_groups} must divide every level's width "
                f"model.base_channels * channel_mults = {widths}"
            )
        reached = [size // 2**i for i in range(len(m.channel_mults))]
        if not set(m.attn_resolutions) <= set(reached):
            raise ValueError(
                f"model.attn_resolutions: {list(m.attn_resolutions)} must be resolutions some "
                f"level reaches on {size}x{size} images: {reached}"
            )
        return self

    @model_validator(mode="after")
    def _check_subset_sizes(self) -> Config:
        n = self.data.num_train
        keep = round(self.retrain.fraction * n)
        if keep < 2 or n - keep < 2:
            raise ValueError(
                f"retrain.fraction: {self.retrain.fraction:g} of the {n} training examples "
                f"keeps {keep} and drops {n - keep}; both must be at least 2, i.e. the "
                f"fraction must lie in [{2 / n:.3g}, {1 - 2 / n:.3g}]"
            )
        labels = [f"{f:g}" for f in self.counterfactual.fractions]
        twice = [x for i, x in enumerate(labels) if x in labels[:i]]
        if twice:
            raise ValueError(
                f"counterfactual.fractions: two fractions print as {twice[0]} (models are "
                "named by it); give distinct values"
            )
        for f in self.counterfactual.fractions:
            left = n - round(f * n)
            if left < 2 or round(f * n) < 1:
                raise ValueError(
                    f"counterfactual.fractions: removing {f:g} of the {n} training examples "
                    f"removes {round(f * n)} and leaves {left}; it must remove at least 1 and "
                    "leave at least 2"
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


def _allowed_keys(loc: tuple) -> str:
    """The keys allowed where ``loc`` (a section, or the top level) points."""
    if len(loc) == 1:
        return ", ".join(Config.model_fields)
    section = Config.model_fields.get(str(loc[0]))
    return ", ".join(section.annotation.model_fields) if section else ""


def _format(err: ValidationError, source: str, prefix: tuple = ()) -> str:
    """One line per error of ``err``, naming its key (``prefix`` + its location)."""
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        loc = (*prefix, *e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            msg = "unknown key" + (f"; allowed here: {allowed}" if allowed else "")
        elif e["type"] != "missing" and "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        # cross-section and section checks name their keys in the message itself
        named = not loc or msg.startswith(f"{key}.")
        lines.append(f"  {msg}" if named else f"  {key}: {msg}")
    return "\n".join(lines)


def _sections() -> str:
    return ", ".join(Config.model_fields)


def missing_keys(raw: dict) -> list[str]:
    """Lines naming every section and key of :class:`Config` that ``raw`` leaves out (a
    section that is not a mapping is left to the schema's own message)."""
    lines = []
    for name, field in Config.model_fields.items():
        if name not in raw:
            lines.append(
                f"  {name}: missing section (a parameters file lists every section: {_sections()})"
            )
            continue
        if isinstance(raw[name], dict):
            for key, f in field.annotation.model_fields.items():
                if key not in raw[name]:
                    default = json.dumps(
                        f.default if not isinstance(f.default, tuple) else list(f.default)
                    )
                    lines.append(
                        f"  {name}.{key}: missing key (a parameters file spells out every key; "
                        f"the default is {default})"
                    )
    return lines


def parse_config(raw: object, source: str = "params", *, complete: bool = False) -> Config:
    """Validate a mapping (e.g. parsed YAML) against :class:`Config`; with ``complete``, every
    section and key must be given (:func:`missing_keys`), as in a parameters file."""
    if not isinstance(raw, dict):
        what = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(
            f"invalid parameters in {source}: (top level): expected a mapping of the sections "
            f"{_sections()}, got {what}"
        )
    lines = missing_keys(raw) if complete else []
    if not lines:
        try:
            return Config.model_validate(raw)
        except ValidationError as err:
            lines = _format(err, source).splitlines()[1:]
    else:  # the keys given, each section on its own: no check of defaults nobody chose
        for name, value in raw.items():
            field = Config.model_fields.get(name)
            try:
                if field is None:
                    Config.model_validate({name: value})
                else:
                    field.annotation.model_validate(value)
            except ValidationError as err:
                prefix = () if field is None else (name,)
                lines += _format(err, source, prefix).splitlines()[1:]
    raise ConfigError("\n".join([f"invalid parameters in {source}:", *lines]))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML itself keeps
    the last one silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate a parameters file; raises :class:`ConfigError` naming bad keys.

    The file must be UTF-8 YAML (safe tags only, no key twice) spelling out every section and
    key (:func:`parse_config` with ``complete=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameters file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"{path} cannot be read as UTF-8 text: {err}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_config(raw, str(path), complete=True)


def dump_config(config: Config) -> str:
    """YAML text of a config with every key spelled out (how ``configs/*.yaml`` are written)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


#: What ``--write`` puts in its file: the same bytes for every valid parameters file, so that
#: the ``validate`` stage's output changes no other stage's dependencies.
VALID_MARKER = {"params": "valid"}

USAGE = "usage: python -m diffusion_attribution.core.config [PARAMS.yaml] [--write MARKER.json]"


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_attribution.core.config [params.yaml] [--write PATH]``: validate,
    print errors, exit 2; with ``--write``, write :data:`VALID_MARKER` to ``PATH`` once the
    file is valid (atomically)."""
    args = list(sys.argv[1:] if argv is None else argv)
    write = None
    if "--write" in args:
        i = args.index("--write")
        if i + 1 >= len(args):
            print(USAGE, file=sys.stderr)
            return 2
        write = args[i + 1]
        del args[i : i + 2]
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print(USAGE, file=sys.stderr)
        return 2
    path = args[0] if args else "params.yaml"
    try:
        load_config(path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if write is not None:
        from diffusion_attribution.core.io import atomic_write_text

        atomic_write_text(json.dumps(VALID_MARKER) + "\n", write)
    print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
