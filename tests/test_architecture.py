"""The library's shape, checked on its syntax trees: no import cycle, no library import hidden
inside a function, no module over 500 lines, no function over 120, no private name taken from
another module. The layer contract itself is import-linter's (``lint-imports``, configured in
``pyproject.toml``); :func:`test_import_contracts_hold` runs it when it is installed."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import diffusion_attribution

PACKAGE = "diffusion_attribution"
LIB = Path(diffusion_attribution.__file__).resolve().parent
ROOT = LIB.parents[1]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 120


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(LIB).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = name.split(".")[1:]
    base = LIB.joinpath(*rel)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


MODULES = {module_name(p): p for p in sorted(LIB.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def imported(name: str, node: ast.Import | ast.ImportFrom) -> list[tuple[str, str | None]]:
    """(module, imported name or None) pairs of the package that ``node`` in module ``name``
    imports; a name that is itself a module (``from pkg import mod``) is returned as a module."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level:
        here = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
        base = here[: len(here) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    if mod.split(".")[0] != PACKAGE:
        return []
    out = []
    for a in node.names:
        full = f"{mod}.{a.name}"
        out.append((full, None) if is_module(full) else (mod, a.name))
    return out


def function_nodes(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere (inside functions too)."""
    graph = {name: set() for name in MODULES}
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for mod, _ in imported(name, node):
                    if mod in MODULES and mod != name:
                        graph[name].add(mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_no_library_import_inside_a_function() -> None:
    """Package modules are imported at the top of a module: with no cycle there is nothing to
    dodge. Imports inside functions are left only for heavy or optional third-party packages,
    so that ``import diffusion_attribution`` and the pipeline's entry points stay cheap."""
    found = []
    for name, tree in TREES.items():
        for fn in function_nodes(tree):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and imported(name, node):
                    found.append(f"{name}.{fn.name} (line {node.lineno})")
    assert found == []


def test_no_module_over_500_lines() -> None:
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_function_over_120_lines() -> None:
    long = {
        f"{name}.{fn.name}": fn.end_lineno - fn.lineno + 1
        for name, tree in TREES.items()
        for fn in function_nodes(tree)
        if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert long == {}


def test_no_private_name_from_another_module() -> None:
    """``from m import _x`` and ``m._x`` for a package module ``m`` other than the importer."""
    found = []
    for name, tree in TREES.items():
        aliases = {}  # local name -> package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for mod, attr in imported(name, node):
                    if attr is not None and attr.startswith("_") and mod != name:
                        found.append(f"{name}: from {mod} import {attr}")
                if isinstance(node, ast.ImportFrom):
                    for a, (mod, attr) in zip(node.names, imported(name, node), strict=False):
                        if attr is None:
                            aliases[a.asname or a.name] = mod
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and aliases[node.value.id] != name
            ):
                found.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    assert found == []


def test_import_contracts_hold() -> None:
    """The layers and independence contracts of ``pyproject.toml`` (``lint-imports``)."""
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run(
        ["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_all_lists_only_names_defined_in_the_module() -> None:
    """No re-exports: a name in a module's ``__all__`` is defined there, not imported."""
    found = []
    for name, tree in TREES.items():
        defined, exported = set(), []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        defined.add(t.id)
                        if t.id == "__all__" and isinstance(node.value, (ast.List, ast.Tuple)):
                            exported = [e.value for e in node.value.elts]
        found += [f"{name}: {e}" for e in exported if e not in defined]
    assert found == []


def test_the_module_map_in_docs_names_every_module() -> None:
    """``docs/library.md`` has one row per module of the package, and no row for a module that
    does not exist."""
    text = (ROOT / "docs" / "library.md").read_text()
    rows = set(re.findall(r"^\| `(diffusion_attribution[\w.]*)` \|", text, re.M))
    assert rows == set(MODULES), {
        "missing from docs/library.md": sorted(set(MODULES) - rows),
        "no such module": sorted(rows - set(MODULES)),
    }
