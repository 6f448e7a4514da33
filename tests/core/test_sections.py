"""The sections of params.yaml (diffusion_attribution.core.sections): the retraining
protocol's seeds and epoch-matched steps."""

from diffusion_attribution.core.config import Config, parse_config


def test_protocol_overrides_are_explicit():
    """A run may deviate from epoch matching only by saying so."""
    raw = Config().model_dump(mode="json")
    raw["retrain"].update(steps=300, epoch_matched=False)
    c = parse_config(raw)
    assert c.retrain.steps == 300 and not c.retrain.epoch_matched
    d = Config()
    assert d.retrain.steps == round(d.retrain.fraction * d.train.steps)
    assert d.retrain.seeds == (100, 101, 102) and d.train.seed not in d.retrain.seeds
    assert d.retrain.independent_seeds == tuple(range(103, 111))
