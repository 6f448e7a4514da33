"""The README's "use the library on your own model" example runs as written."""

import re
from pathlib import Path

import torch

import diffusion_attribution as da
from diffusion_attribution.diffusion.unet import UNet
from tests.helpers import TINY_4X4

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("### Use the library on your own model") :]
    section = section[: section.index("\n## ")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return next(b for b in blocks if "da.Attributor(model" in b)


def test_public_names_resolve():
    for name in da.__all__:
        assert getattr(da, name) is not None, name


def test_readme_example_runs_on_a_tiny_model():
    torch.manual_seed(0)
    model = UNet(TINY_4X4).eval()
    g = torch.Generator().manual_seed(1)
    env = {
        "model": model,
        "train_images": torch.rand(6, 1, 4, 4, generator=g) * 2 - 1,
        "queries": torch.rand(2, 1, 4, 4, generator=g) * 2 - 1,
    }
    exec(compile(readme_example(), "README example", "exec"), env)
    s = env["scores"].matrix
    assert s.shape == (2, 6) and torch.isfinite(s).all() and s.abs().sum() > 0
    assert env["scores"].settings.method == "d-trak"
