"""Run a profile in a copy of the repository, beside the default run and touching none of it.

``python -m diffusion_attribution.pipeline.sandbox smoke`` is the ten-minute look at the artifact: it
copies the repository's files (what git tracks, and untracked files it does not ignore) into
``runs/smoke/``, makes ``configs/smoke.yaml`` that copy's ``params.yaml``, and runs
``dvc repro`` there, with the copy's own library on ``PYTHONPATH``. Every figure, the claims
table and the report (``runs/smoke/reports/index.html``) come out in about eight minutes on two
cores. The smoke profile is tiny (16 samples, 4 subsets, 60 training steps): its numbers and
verdicts are noise and say nothing about the paper. The tracked ``params.yaml``, the default
run's outputs, its retrained models and its resumable caches are not read or written; the copy
has its own DVC cache (``runs/`` is ignored by git and DVC).

``--dir PATH`` puts the copy elsewhere; ``--prepare-only`` makes the copy without running it.
Running again continues in the same copy (``dvc repro`` resumes; nothing finished is redone),
after refreshing its code and notebooks from the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: The repository this package is installed from (an editable install of the checkout).
REPO = Path(__file__).resolve().parents[3]


def tracked_files(repo: str | Path = REPO) -> list[str]:
    """What git tracks in ``repo``, and the untracked files it does not ignore (relative
    paths). ``RuntimeError`` when ``repo`` is not a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"{repo} is not a git checkout (git ls-files failed: {err})") from None
    return [f for f in listed.split("\0") if f and (Path(repo) / f).is_file()]


def prepare(profile: str, dest: str | Path, repo: str | Path = REPO) -> Path:
    """Copy ``repo``'s files into ``dest`` with ``configs/<profile>.yaml`` as its
    ``params.yaml`` and a git repository of its own (DVC runs in one); returns ``dest``.
    ``ValueError`` naming the profiles for an unknown one, before anything is copied."""
    repo, dest = Path(repo), Path(dest)
    profiles = sorted(p.stem for p in (repo / "configs").glob("*.yaml"))
    if profile not in profiles:
        raise ValueError(f"unknown profile {profile!r}; profiles are: {', '.join(profiles)}")
    if dest.resolve() == repo.resolve():
        raise ValueError("the copy cannot be the repository itself")
    for f in tracked_files(repo):
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / f, target)
    shutil.copy2(repo / "configs" / f"{profile}.yaml", dest / "params.yaml")
    if not (dest / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    source = {"profile": profile, "commit": _head(repo), "dirty": _dirty(repo)}
    (dest / SOURCE).write_text(json.dumps(source, indent=1) + "\n")
    return dest


#: The file in a copy naming its profile and the commit it was copied from (the shipped
#: bundle's manifest reads it: the copy's own git repository has no history).
SOURCE = ".sandbox.json"


def _head(repo: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _dirty(repo: Path) -> bool:
    done = subprocess.run(
        ["git", "status", "--porcelain", "--", "lib", "notebooks", "params.yaml", "configs",
         "dvc.yaml", "pyproject.toml"],
        cwd=repo, capture_output=True, text=True,
    )  # fmt: skip
    return bool(done.stdout.strip())


def environment(dest: str | Path) -> dict[str, str]:
    """This process's environment with the copy's library first on ``PYTHONPATH``."""
    env = dict(os.environ)
    lib = str(Path(dest).resolve() / "lib")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lib, env.get("PYTHONPATH")) if p)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_attribution.pipeline.sandbox",
        description="Run a profile (configs/<profile>.yaml) in a copy of the repository.",
    )
    parser.add_argument(
        "profile", help="e.g. smoke: every figure in minutes; its verdicts are noise"
    )
    parser.add_argument("--dir", type=Path, help="where the copy goes (default: runs/<profile>)")
    parser.add_argument("--prepare-only", action="store_true", help="copy, do not run")
    args = parser.parse_args(argv)
    dest = args.dir or REPO / "runs" / args.profile
    try:
        prepare(args.profile, dest)
    except (ValueError, RuntimeError) as err:
        print(f"sandbox: {err}", file=sys.stderr)
        return 2
    print(f"sandbox: the {args.profile} profile in {dest}")
    if args.prepare_only:
        return 0
    run = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=dest, env=environment(dest))
    if run.returncode == 0:
        print(f"sandbox: report at {dest / 'reports' / 'index.html'}")
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
