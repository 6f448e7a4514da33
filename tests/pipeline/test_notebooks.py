"""The stage notebooks are committed stripped, parameterised by papermill, and thin."""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_carry_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: strip outputs"
            )
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    # no experiment value of its own: papermill passes params.yaml, or it is read by hand
    code = [
        line for line in tagged[0].source.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert code == ["params = None"], f"{path.name}: the parameters cell holds values"
    # thin: one stage call, figures and prose; no logic of its own
    lines = [
        ln for c in nb.cells if c.cell_type == "code" for ln in c.source.splitlines() if ln.strip()
    ]
    assert len(lines) <= 40, f"{path.name}: {len(lines)} code lines"
    assert not any(ln.lstrip().startswith(("def ", "class ", "for ", "while ")) for ln in lines), (
        path.name
    )
