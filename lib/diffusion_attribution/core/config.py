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
and image size (:data:`~diffusion_attribution.core.sections.TRAIN_SIZES`,
:data:`~diffusion_attribution.core.sections.IMAGE_SIZES`), e.g. a U-Net whose levels or
attention resolutions do not fit the images. The sections themselves, one per phase, are in
:mod:`diffusion_attribution.core.sections`.

Where a job runs (CPU or GPU, local processes or SLURM) is an execution setting, not an
experiment setting: it lives in environment variables (see
:mod:`diffusion_attribution.pipeline.runner`), so moving to a cluster does not invalidate
results.
"""

from __future__ import annotations

import json
import math
import sys
import typing
from pathlib import Path

import yaml
from pydantic import ValidationError, model_validator

from diffusion_attribution.core.io import atomic_write_text
from diffusion_attribution.core.sections import (
    IMAGE_SIZES,
    ConditionalConfig,
    CounterfactualConfig,
    CurvatureConfig,
    DataConfig,
    DiffusionConfig,
    FinetuneConfig,
    InfluenceConfig,
    MeasureConfig,
    ModelConfig,
    ProtocolConfig,
    RetrainConfig,
    SampleConfig,
    Section,
    TrainConfig,
    TrakConfig,
    epoch_matched_steps,
)


class Config(Section):
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
    protocol: ProtocolConfig = ProtocolConfig()
    #: LoRA fine-tuning of a base model (beyond the paper); ``None``: train from scratch.
    finetune: FinetuneConfig | None = None
    #: A class-conditional model with guidance (beyond the paper); ``None``: unconditional.
    conditional: ConditionalConfig | None = None

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
        for key, given, allowed in (
            ("influence.ablation_measurements", self.influence.ablation_measurements, names),
            # TRAK of the journey measurement is Journey-TRAK (the baselines stage only)
            ("trak.query_measurements", self.trak.query_measurements, names | {"journey"}),
        ):
            unknown = sorted(set(given) - allowed)
            if unknown:
                raise ValueError(f"{key}: unknown {unknown}; choose from {sorted(allowed)}")
        return self

    @model_validator(mode="after")
    def _check_finetune(self) -> Config:
        if self.finetune and self.data.dataset != "digits10":
            raise ValueError(
                f"finetune: LoRA fine-tuning draws its base and fine-tuning classes from "
                f"digits10; set data.dataset: digits10 (got {self.data.dataset})"
            )
        return self

    @model_validator(mode="after")
    def _check_conditional(self) -> Config:
        if self.conditional and self.finetune:
            raise ValueError("conditional: not with finetune (set one of them to null)")
        if self.conditional and (self.protocol.fit_draws or self.protocol.projection_dims):
            raise ValueError(
                "conditional: the protocol's budget study fits unconditional models only; set "
                "protocol.fit_draws and protocol.projection_dims to []"
            )
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
        n = self.finetune.size if self.finetune else self.data.num_train
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


class ConfigError(ValueError):
    """Invalid parameters; the message names every offending key."""


def _allowed_keys(loc: tuple) -> str:
    """The keys allowed where ``loc`` (a section, or the top level) points."""
    if len(loc) == 1:
        return ", ".join(Config.model_fields)
    if str(loc[0]) not in Config.model_fields:
        return ""
    return ", ".join(section_type(str(loc[0])).model_fields)


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


def section_type(name: str) -> type[Section]:
    """The section class of ``Config``'s field ``name`` (an optional one's, for ``finetune`` and ``conditional``)."""
    annotation = Config.model_fields[name].annotation
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
    return kinds[0] if kinds else annotation


def _sections() -> str:
    return ", ".join(Config.model_fields)


def missing_keys(raw: dict) -> list[str]:
    """Lines naming every section and key of :class:`Config` that ``raw`` leaves out (a
    section that is not a mapping is left to the schema's own message)."""
    lines = []
    for name in Config.model_fields:
        if name not in raw:
            lines.append(
                f"  {name}: missing section (a parameters file lists every section: {_sections()})"
            )
            continue
        if isinstance(raw[name], dict):
            for key, f in section_type(name).model_fields.items():
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
                elif value is not None or section_type(name) is field.annotation:
                    section_type(name).model_validate(value)
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
        atomic_write_text(json.dumps(VALID_MARKER) + "\n", write)
    print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
