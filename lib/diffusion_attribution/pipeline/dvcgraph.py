"""``dvc.yaml`` derived from the stage modules, not kept by hand.

For each stage of :mod:`diffusion_attribution.pipeline.stages`:

- **library dependencies**: the package's modules the stage module imports, followed through
  their own imports (every ``import`` statement, including those inside functions), found by
  parsing the source (:func:`library_deps`);
- **parameters**: the ``params.yaml`` keys the stage module reads, found by parsing its code for
  ``config.<section>.<key>`` (and for names bound to ``config.<section>``); a section used
  whole (passed on, or a key that is not a field) is a dependency as a whole
  (:func:`params_read`). The stage module must hand only sections or values to other code,
  never ``config`` itself, so that nothing it reads escapes this scan;
- **data dependencies and outputs**: what the module declares (``INPUTS``, ``OUTS``,
  ``PERSIST``, ``FIGURES``, ``METRICS``), plus its notebook.

A first stage, ``validate`` (:func:`validate_spec`), validates the whole ``params.yaml``
(``python -m diffusion_attribution.core.config params.yaml --write VALIDATED``) and every other
stage depends on its small output :data:`VALIDATED`. DVC deletes a stage's outputs right
before it runs the stage's command, so without it a bad value would first cost the outputs
of the stage that reports it; with it, ``dvc repro`` stops at ``validate`` and deletes
nothing. Its output holds the same bytes for every valid file, so editing one parameter
reruns only the stages that read it.

A last stage, ``report`` (:func:`report_spec`), writes the offline HTML report from every
other stage's metrics, figures and executed notebook.

``python -m diffusion_attribution.pipeline.dvcgraph`` prints the ``dvc.yaml`` this gives;
``--check`` exits 1 when the committed ``dvc.yaml`` differs (a test runs it).
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import yaml

from diffusion_attribution.core.config import Config, section_type
from diffusion_attribution.pipeline import report, stages

PACKAGE = "diffusion_attribution"
LIB = Path(__file__).resolve().parents[1]
HEADER = """\
# Derived from the stage modules by `python -m diffusion_attribution.pipeline.dvcgraph > dvc.yaml`:
# do not edit by hand (a test fails when this file and the stages disagree).
# Each stage executes one notebook with papermill through
# `python -m diffusion_attribution.pipeline.runner STAGE`, which first validates params.yaml; the first
# stage, validate, checks the whole params.yaml before DVC deletes any stage's outputs.
# Executed notebooks (reports/notebooks/) are outputs, and dependencies of the last stage only
# (report, the offline HTML page): they carry timestamps.
"""


def _module_file(name: str) -> Path | None:
    """The file of package module ``diffusion_attribution.<name>`` (dotted), if it exists."""
    rel = name.split(".")[1:]
    base = LIB.joinpath(*rel) if rel else LIB
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(LIB).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Package modules imported anywhere in ``path`` (absolute names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PACKAGE:
                continue
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from . import claims`
    return {m for m in found if _module_file(m) is not None}


@cache
def library_deps(module: str) -> frozenset[Path]:
    """Every package file ``module`` needs: itself, the packages above it and what it imports,
    transitively."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        todo += sorted(_imports(_module_file(name)))
    return frozenset(_module_file(m) for m in seen)


def _fields(section: str) -> set[str]:
    return set(section_type(section).model_fields)


def params_read(path: Path, arg: str = "config") -> set[str]:
    """``params.yaml`` keys read by the code in ``path`` through the name ``arg``: ``"train"``
    for a whole section, ``"train.steps"`` for one key (module docstring)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    sections = set(Config.model_fields)
    aliases: dict[str, str] = {}
    bound: set[int] = set()  # the config.<section> nodes that define an alias
    for node in ast.walk(tree):  # name = config.<section>, also in tuple assignments
        if isinstance(node, ast.Assign):
            pairs = []
            for target in node.targets:
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs += list(zip(target.elts, node.value.elts, strict=False))
                else:
                    pairs.append((target, node.value))
            for t, v in pairs:
                if (
                    isinstance(t, ast.Name)
                    and isinstance(v, ast.Attribute)
                    and isinstance(v.value, ast.Name)
                    and v.value.id == arg
                    and v.attr in sections
                ):
                    aliases[t.id] = v.attr
                    bound.add(id(v))
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    keys: set[str] = set()
    for node in ast.walk(tree):
        section = None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == arg:
                if id(node) in bound:
                    continue
                if node.attr not in sections:
                    raise ValueError(f"{path.name}:{node.lineno}: {arg}.{node.attr} is no section")
                section, outer = node.attr, parents.get(node)
            else:
                continue
        elif (
            isinstance(node, ast.Name)
            and node.id in aliases
            and not isinstance(node.ctx, ast.Store)
        ):
            section, outer = aliases[node.id], parents.get(node)
        elif isinstance(node, ast.Name) and node.id == arg and not isinstance(node.ctx, ast.Store):
            outer = parents.get(node)
            if isinstance(outer, ast.Attribute) or isinstance(outer, ast.arg):
                continue
            if isinstance(outer, ast.Call) and node in outer.args + [
                k.value for k in outer.keywords
            ]:
                raise ValueError(
                    f"{path.name}:{node.lineno}: pass sections of {arg!r}, not {arg!r} itself, "
                    "so that the keys it reads can be found"
                )
            continue
        else:
            continue
        if section is None:
            continue
        if (
            isinstance(outer, ast.Attribute)
            and outer.value is node
            and outer.attr in _fields(section)
        ):
            keys.add(f"{section}.{outer.attr}")
        else:
            keys.add(section)
    whole = {k for k in keys if "." not in k}
    return {k for k in keys if "." not in k or k.split(".")[0] not in whole}


def _rel(path: Path) -> str:
    return str(path.relative_to(LIB.parent.parent))


DECLARED = ("NOTEBOOK", "INPUTS", "OUTS", "PERSIST", "FIGURES", "METRICS")


def declarations(path: Path) -> SimpleNamespace:
    """The module-level ``NOTEBOOK``, ``INPUTS``, ... of a stage module, read from its source
    (literal values; the module is not imported)."""
    found = {}
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id in DECLARED and node.value is not None:
            found[target.id] = ast.literal_eval(node.value)
    missing = [d for d in DECLARED if d not in found]
    if missing:
        raise ValueError(f"{path.name} does not declare {missing}")
    return SimpleNamespace(**found)


#: Name and output of the stage that validates ``params.yaml`` before any other runs.
VALIDATE = "validate"
VALIDATED = "outputs/validate/params.ok.json"


def validate_spec() -> dict:
    """The ``dvc.yaml`` entry of the ``validate`` stage: the whole parameters file and the
    code that validates it in, :data:`VALIDATED` out (module docstring)."""
    libs = sorted(_rel(p) for p in library_deps(f"{PACKAGE}.core.config"))
    return {
        "cmd": f"python -m {PACKAGE}.core.config params.yaml --write {VALIDATED}",
        "deps": ["params.yaml", *libs],
        "outs": [VALIDATED],
    }


#: The last stage: the offline HTML report (:mod:`diffusion_attribution.pipeline.report`).
REPORT = "report"


def report_spec() -> dict:
    """The ``dvc.yaml`` entry of the ``report`` stage: every stage's metrics, figures and
    executed notebook, the deviations table and the parameters file (whose hash it shows) in;
    ``reports/index.html`` and the rendered notebooks out."""
    libs = sorted(_rel(p) for p in library_deps(f"{PACKAGE}.pipeline.report"))
    deps = ["params.yaml", *libs, report.DEVIATIONS]
    for name in stages.NAMES:
        mod = declarations(_module_file(f"{stages.__name__}.{name}"))
        deps += [*mod.METRICS, *(f"reports/figures/{f}" for f in mod.FIGURES)]
        deps.append(f"reports/notebooks/{mod.NOTEBOOK}")
    return {
        "cmd": f"python -m {PACKAGE}.pipeline.report",
        "deps": deps,
        "outs": [report.INDEX, report.NOTEBOOKS_HTML],
    }


#: The metrics files ``dvc.yaml`` declares as metrics (what ``dvc metrics show`` prints): the
#: ``claims`` stage's headline numbers.
HEADLINE_METRICS = ("metrics/headline.json",)


def stage_spec(name: str) -> dict:
    """The ``dvc.yaml`` entry of stage ``name``."""
    if name not in stages.NAMES:
        raise ValueError(f"unknown stage {name!r}")
    module = f"{stages.__name__}.{name}"
    path = _module_file(module)
    mod = declarations(path)
    libs = sorted(_rel(p) for p in library_deps(module))
    spec: dict = {
        "cmd": f"python -m diffusion_attribution.pipeline.runner {name}",
        "deps": [VALIDATED, f"notebooks/{mod.NOTEBOOK}", *libs, *mod.INPUTS],
    }
    params = sorted(params_read(path))
    if params:
        spec["params"] = params
    outs: list = [{o: {"persist": True}} if o in mod.PERSIST else o for o in mod.OUTS]
    outs += [f"reports/figures/{f}" for f in mod.FIGURES]
    outs.append(f"reports/notebooks/{mod.NOTEBOOK}")
    spec["outs"] = outs
    # `dvc metrics show` prints the headline only; each stage's metrics file is a plain output
    # (`dvc metrics show metrics/<stage>.json` reads it)
    outs += [m for m in mod.METRICS if m not in HEADLINE_METRICS]
    headline = [m for m in mod.METRICS if m in HEADLINE_METRICS]
    if headline:
        spec["metrics"] = headline
    return spec


#: Curves DVC can draw itself (``dvc plots show`` / ``dvc plots diff``, editor integrations);
#: every figure of the paper is a PNG under ``reports/figures/``.
PLOTS = [
    {
        "training loss": {
            "x": "step",
            "y": {"outputs/train/losses.csv": "loss"},
            "title": "Training loss per step",
        }
    }
]


def dvc_yaml() -> str:
    """The whole ``dvc.yaml`` text."""
    body = {
        "stages": {
            VALIDATE: validate_spec(),
            **{name: stage_spec(name) for name in stages.NAMES},
            REPORT: report_spec(),
        },
        "plots": PLOTS,
    }
    return HEADER + yaml.safe_dump(body, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = dvc_yaml()
    if args == ["--check"]:
        committed = (LIB.parent.parent / "dvc.yaml").read_text()
        if committed != text:
            print(
                "dvc.yaml differs from the stages: run `python -m diffusion_attribution.pipeline.dvcgraph > dvc.yaml`",
                file=sys.stderr,
            )
            return 1
        print("dvc.yaml agrees with the stages")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
