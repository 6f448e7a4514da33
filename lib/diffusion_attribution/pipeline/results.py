"""The shipped results: publish a finished run, check a bundle, compare a rerun with it.

``python -m diffusion_attribution.pipeline.results publish --profile NAME [--run DIR]``
    copies the finished run in ``DIR`` (default: this checkout) to ``results/NAME/``
    (:func:`~diffusion_attribution.pipeline.bundle.publish`, the layout in
    :mod:`diffusion_attribution.pipeline.bundle`).
``python -m diffusion_attribution.pipeline.results check [--profile NAME ...]``
    verifies every bundle (or the ones named), :func:`check`: the manifest parses; every
    claim of ``claims.md`` is its ``metrics/claims.json`` entry, and every number in its "this
    run" column is a number of the bundle's metrics; every figure and notebook the report
    names exists; the shipped scores give the shipped LDS on the shipped ground truth. It then
    lists each stage whose code or parameters changed since the manifest's commit (an empty
    list: the bundle is fresh). A broken bundle fails (exit 1); a stale one is reported on its
    first line and passes.
``python -m diffusion_attribution.pipeline.results readme``
    rewrites the README's first-screen paragraph on the bundles (:func:`readme_block`).
``python -m diffusion_attribution.pipeline.results compare --profile NAME [--run DIR]``
    prints each number of a fresh run's metrics beside the bundle's, with the difference in
    units of its standard error where the metrics give one (:func:`compare`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from diffusion_attribution.evaluation.findings import PAPER_FINDINGS
from diffusion_attribution.evaluation.lds import lds, predicted_changes
from diffusion_attribution.pipeline.bundle import MANIFEST_KEYS, file_md5, publish
from diffusion_attribution.pipeline.docs_tables import FINDINGS_BEGIN, FINDINGS_END, findings_block

__all__ = [
    "BundleReport", "check", "claims_block", "compare", "flat_metrics", "readme_block",
    "generated_blocks", "stale_stages", "write_readme",
]  # fmt: skip

REPO = Path(__file__).resolve().parents[3]
RESULTS = REPO / "results"

#: A printed number: sign, digits (thousands separated by commas or not), decimals, exponent,
#: and a ``%`` after it; not a part of a word, an identifier or a figure number ("Fig. 2a").
_NUMBER = re.compile(
    r"(?<![\w.,])([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?)(%?)(?![\w]|\.\d)"
)


@dataclass
class BundleReport:
    """What :func:`check` found in one bundle: ``problems`` (the bundle is broken) and
    ``stale`` (stages whose code or parameters changed since the bundle's commit)."""

    bundle: Path
    commit: str = "unknown"
    problems: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)

    @property
    def first_line(self) -> str:
        name = f"results/{self.bundle.name}"
        if self.problems:
            return f"{name}: BROKEN ({len(self.problems)} problems)"
        if self.stale:
            return f"{name}: STALE against this checkout (commit {self.commit[:10]}): {', '.join(self.stale)}"
        return f"{name}: fresh against this checkout (commit {self.commit[:10]})"


def _params_file(root: Path, profile: str) -> Path:
    return root / "params.yaml" if profile == "default" else root / "configs" / f"{profile}.yaml"


def _lookup(params: dict, dotted: str):
    value = params
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


_MISSING = object()


def _same(a, b) -> bool:
    """Parameter values equal, reading numbers the way DVC's lock writes them (``1e-08`` may
    be a string there: YAML 1.1 has no float without a dot)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if a == b:
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return False  # True == 1 in Python; not as a parameter
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def stale_stages(bundle: Path, root: Path = REPO, profile: str | None = None) -> list[str]:
    """The stages of the bundle's ``dvc.lock`` whose tracked code (files under ``lib/`` and
    ``notebooks/``), command or parameters differ in the checkout ``root`` (its ``params.yaml``
    for the default profile, ``configs/<profile>.yaml`` for another), the stages downstream of
    them (a dependency is another stale stage's output), and the stages of ``root``'s
    ``dvc.yaml`` the lock does not have. Run outputs are not compared: a fresh clone has none."""
    lock = yaml.safe_load((bundle / "dvc.lock").read_text())["stages"]
    profile = profile or bundle.name
    params = yaml.safe_load(_params_file(root, profile).read_text())
    current = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    stale = []
    for name, stage in lock.items():
        changed = name in current and current[name].get("cmd") != stage.get("cmd")
        for dep in stage.get("deps", []):
            path = dep["path"]
            if not path.startswith(("lib/", "notebooks/")):
                continue
            f = root / path
            changed |= not f.is_file() or file_md5(f) != dep.get("md5")
        for values in stage.get("params", {}).values():
            changed |= not all(_same(_lookup(params, k), v) for k, v in values.items())
        if changed:
            stale.append(name)
    outs = {o["path"]: name for name, stage in lock.items() for o in stage.get("outs", [])}
    grown = True
    while grown:  # downstream: a stage reading an output of a stale stage
        grown = False
        for name, stage in lock.items():
            upstream = {outs.get(d["path"]) for d in stage.get("deps", [])}
            if name not in stale and upstream & set(stale):
                stale.append(name)
                grown = True
    order = [n for n in lock if n in stale]
    return order + [name for name in current if name not in lock]


def flat_metrics(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Every number of the metrics files in ``folder`` by path (``lds/loss/K-FAC influence/lds``;
    list items by index)."""
    out: dict[str, float] = {}

    def walk(x, path):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}/{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}/{i}")
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out[path] = float(x)

    for f in sorted(folder.glob("*.json")):
        if f.stem not in skip:
            walk(json.loads(f.read_text()), f.stem)
    return out


def _found(text: str, percent: str, values: np.ndarray) -> bool:
    """A printed number equals a metric, sign included, to half a unit of its last printed
    digit (``1e-4``: of its exponent's); a percentage equals 100 x a metric (or the metric)."""
    x = float(text.replace(",", ""))
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    tol = 0.5 * 10.0 ** (int(exponent or 0) - decimals) * (1 + 1e-9)
    candidates = [values, 100 * values] if percent else [values]
    return any(bool(np.any(np.abs(v - x) <= tol)) for v in candidates)


def _claim_problems(bundle: Path) -> list[str]:
    claims = json.loads((bundle / "metrics" / "claims.json").read_text())["claims"]
    table = (bundle / "claims.md").read_text()
    values = np.array(list(flat_metrics(bundle / "metrics", skip=("claims",)).values()))
    problems = []
    for c in claims:
        row = next(
            (line for line in table.splitlines() if line.startswith(f"| {c['claim']} |")), None
        )
        if row is None:
            problems.append(f"claims.md has no row for claim {c['id']!r}")
            continue
        # claim | the paper reports | figure | this run | verdict: this run's cell is checked
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        evidence, verdict_cell = cells[-2], cells[-1]
        if evidence != c["evidence"] or c["verdict"] not in verdict_cell:
            problems.append(f"claims.md row {c['id']!r} differs from metrics/claims.json")
        # a several-part claim's counts of its parts ("1 of 4 comparisons") are not metrics
        numbers = _NUMBER.findall(re.sub(r"\d+ of \d+ comparisons", "", evidence))
        missing = [n + pct for n, pct in numbers if not _found(n, pct, values)]
        if missing:
            problems.append(f"claim {c['id']!r}: {', '.join(missing)} not in the metrics")
    return problems


def _file_problems(bundle: Path) -> list[str]:
    report = (bundle / "report.html").read_text()
    named = set(re.findall(r'(?:src|href)="((?:figures|notebooks_html|notebooks)/[^"#]+)"', report))
    problems = [
        f"report.html names {p}, not in the bundle"
        for p in sorted(named)
        if not (bundle / p).is_file()
    ]
    try:
        info = json.loads((bundle / "manifest.json").read_text())
        absent = [k for k in MANIFEST_KEYS if k not in info]
        if absent:
            problems.append(f"manifest.json lacks {', '.join(absent)}")
    except (OSError, json.JSONDecodeError) as err:
        problems.append(f"manifest.json does not parse: {err}")
    return problems


def _score_problems(bundle: Path) -> list[str]:
    """The shipped scores give the shipped LDS on the shipped ground truth (to 1e-9)."""
    gt = np.load(bundle / "ground_truth.npz")
    scores = np.load(bundle / "scores.npz")
    index = json.loads((bundle / "scores.json").read_text())
    masks = torch.from_numpy(gt["masks"])
    problems = []
    for name, entry in index.items():
        for target, shipped in entry["lds"].items():
            measured = torch.from_numpy(gt[f"subsets.{target}"])
            s = torch.from_numpy(scores[name])[: measured.shape[0]]
            got = lds(shipped["sign"] * predicted_changes(s, masks), measured).mean
            if not (
                math.isclose(got, shipped["lds"], abs_tol=1e-9)
                or (math.isnan(got) and math.isnan(shipped["lds"]))
            ):
                problems.append(
                    f"scores {name} ({target}): LDS {got:.6f}, shipped {shipped['lds']:.6f}"
                )
    return problems


def check(bundle: str | Path, root: str | Path = REPO) -> BundleReport:
    """:class:`BundleReport` of one bundle against the checkout ``root`` (module docstring)."""
    bundle, root = Path(bundle), Path(root)
    report = BundleReport(bundle)
    needed = ["manifest.json", "claims.md", "report.html", "dvc.lock", "metrics/claims.json",
              "ground_truth.npz", "scores.npz", "scores.json"]  # fmt: skip
    absent = [p for p in needed if not (bundle / p).exists()]
    if absent:
        report.problems.append(f"missing {', '.join(absent)}")
        return report
    report.problems += _file_problems(bundle)
    if not report.problems:
        report.commit = json.loads((bundle / "manifest.json").read_text())["commit"]
    for part in (_claim_problems, _score_problems):
        try:
            report.problems += part(bundle)
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:
            report.problems.append(f"{part.__name__.strip('_')}: {type(err).__name__}: {err}")
    try:
        report.stale = stale_stages(bundle, root)
    except (OSError, KeyError, ValueError, yaml.YAMLError) as err:
        report.problems.append(f"stale_stages: {type(err).__name__}: {err}")
    return report


#: Metrics about the run rather than its results (what was recomputed, time, memory), which
#: :func:`compare` leaves out.
BOOKKEEPING = ("seconds", "this_run", "peak_rss", "overhead")


def compare(bundle: str | Path, run: str | Path = ".") -> pd.DataFrame:
    """Every number of the fresh run's ``metrics/`` beside the bundle's: ``shipped``,
    ``fresh``, ``difference`` and, where the metric is a mean with a ``stderr`` beside it,
    ``in_stderr`` (difference / shipped standard error). :data:`BOOKKEEPING` is left out."""
    shipped = flat_metrics(Path(bundle) / "metrics")
    fresh = flat_metrics(Path(run) / "metrics")
    rows = []
    for path, value in shipped.items():
        if path not in fresh or any(word in path for word in BOOKKEEPING):
            continue
        parent = path.rsplit("/", 1)[0]
        se = shipped.get(f"{parent}/stderr") if not path.endswith("stderr") else None
        diff = fresh[path] - value
        rows.append(
            {"metric": path, "shipped": value, "fresh": fresh[path], "difference": diff,
             "in_stderr": diff / se if se else float("nan")}
        )  # fmt: skip
    return pd.DataFrame(rows)


def _bundles(results: Path) -> list[Path]:
    """The bundles in ``results`` (a folder with a manifest; not a dot-named one a publish left)."""
    if not results.is_dir():
        return []
    return sorted(
        p
        for p in results.iterdir()
        if not p.name.startswith(".") and (p / "manifest.json").exists()
    )


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def readme_block(results: Path = RESULTS) -> str:
    """The README's first-screen paragraph on the shipped bundles, written from their
    manifests and claims (``results readme`` puts it between :data:`README_BEGIN` and
    :data:`README_END`; a test fails when the README holds anything else there)."""
    lines = [
        README_BEGIN,
        "**Results without running anything** (written by `results publish` from finished runs):",
    ]
    for bundle in _bundles(results):
        info = json.loads((bundle / "manifest.json").read_text())
        counts = json.loads((bundle / "metrics" / "claims.json").read_text())["counts"]
        verdicts = ", ".join(f"{v} {n}" for v, n in counts.items() if n)
        lines.append(
            f"- `{bundle.name}`: [report](results/{bundle.name}/report.html), "
            f"[claims](results/{bundle.name}/claims.md), "
            f"[notebooks](results/{bundle.name}/notebooks/), ground truth and scores "
            f"([fields](results/{bundle.name}/README.md)); commit `{info['commit'][:10]}`, "
            f"{info['total_seconds'] / 60:.0f} min of stages on {info['cores']} cores of "
            f"{info['cpu']}; claims: {verdicts}."
        )
    lines += [
        "",
        "`python -m diffusion_attribution.pipeline.results check` says whether each bundle is "
        "fresh against the checkout; `... results compare --profile default` sets a rerun beside it.",
        README_END,
    ]
    return "\n".join(lines)


CLAIMS_BEGIN, CLAIMS_END = "<!-- claims:begin -->", "<!-- claims:end -->"


def claims_block(results: Path = RESULTS, profile: str = "default") -> str:
    """The README's claims table: the shipped bundle's ``metrics/claims.json`` (each claim, what
    the paper reports, its figure, the run's evidence and verdict) and the ceiling and two reference methods from its
    ``metrics/lds.json``, between :data:`CLAIMS_BEGIN` and :data:`CLAIMS_END`."""
    bundle = results / profile
    claims = json.loads((bundle / "metrics" / "claims.json").read_text())["claims"]
    loss = json.loads((bundle / "metrics" / "lds.json").read_text())["loss"]
    rows = [
        "| "
        + " | ".join(
            x.replace("|", "/")
            for x in (
                c["claim"],
                c.get("paper") or PAPER_FINDINGS.get(c["id"], ""),
                c["figure"],
                c["evidence"],
                c["verdict"],
            )
        )
        + " |"
        for c in claims
    ]
    refs = "; ".join(
        f"{label} {loss[label]['lds']:.3f} ± {loss[label]['stderr']:.3f}"
        for label in (
            "approximate ceiling (K-seed mean)",
            "K-FAC influence",
            "EK-FAC influence",
            "pixel similarity",
        )
        if label in loss
    )
    return "\n".join(
        [CLAIMS_BEGIN, "| claim | the paper reports | figure | this run | verdict |",
         "|---|---|---|---|---|", *rows, "",
         f"Loss LDS of `results/{profile}` (mean ± standard error over samples): {refs}.", CLAIMS_END]
    )  # fmt: skip


#: The files with generated blocks, and the blocks: (begin marker, end marker, writer).
GENERATED_FILES = ("README.md", "docs/results.md")
BLOCKS = (
    (README_BEGIN, README_END, readme_block),
    (CLAIMS_BEGIN, CLAIMS_END, claims_block),
    (FINDINGS_BEGIN, FINDINGS_END, findings_block),
)


def generated_blocks(text: str, results: Path = RESULTS) -> list[tuple[str, str]]:
    """(found, expected) for every block of :data:`BLOCKS` whose markers are in ``text``."""
    out = []
    for begin, end, block in BLOCKS:
        if begin not in text:
            continue
        if text.count(begin) != 1 or text.count(end) != 1:
            raise ValueError(f"{begin} and {end} must each appear once")
        start = text.index(begin)
        stop = text.index(end, start) + len(end)  # ValueError when the end comes first
        out.append((text[start:stop], block(results)))
    return out


def write_readme(root: Path = REPO, results: Path = RESULTS) -> list[str]:
    """Rewrite every generated block of :data:`GENERATED_FILES` from the bundles; returns the
    files that changed."""
    changed = []
    for name in GENERATED_FILES:
        path = root / name
        text = new = path.read_text()
        for found, expected in generated_blocks(text, results):
            new = new.replace(found, expected, 1)
        if new != text:
            path.write_text(new)
            changed.append(name)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion_attribution.pipeline.results")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish", help="copy a finished run to results/<profile>/")
    p.add_argument("--profile", required=True)
    p.add_argument("--run", type=Path, default=Path("."), help="the run's checkout")
    c = sub.add_parser("check", help="verify the shipped bundles; list stale stages")
    c.add_argument("--profile", action="append", help="default: every bundle in results/")
    m = sub.add_parser("compare", help="a fresh run's metrics beside the shipped bundle's")
    m.add_argument("--profile", required=True)
    m.add_argument("--run", type=Path, default=Path("."))
    sub.add_parser("readme", help="rewrite the README's results paragraph from the bundles")
    args = parser.parse_args(argv)
    if args.command == "publish":
        print(f"published {publish(args.run, args.profile, RESULTS)}")
        return 0
    if args.command == "readme":
        changed = write_readme()
        print(
            f"updated {', '.join(changed)}" if changed else "README.md and docs already up to date"
        )
        return 0
    if args.command == "compare":
        table = compare(RESULTS / args.profile, args.run)
        moved = table[table.difference != 0]
        print(f"{len(table)} numbers compared, {len(moved)} differ")
        with pd.option_context("display.max_rows", None, "display.width", 160):
            print(moved.to_string(index=False) if len(moved) else "identical")
        return 0
    names = args.profile or sorted(
        p.name for p in RESULTS.iterdir() if (p / "manifest.json").exists()
    )
    if not names:
        print("no bundles in results/", file=sys.stderr)
        return 1
    broken = False
    for name in names:
        report = check(RESULTS / name)
        print(report.first_line)
        for problem in report.problems:
            print(f"  {problem}")
        broken |= bool(report.problems)
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
