"""The cluster file (``DA_CLUSTER``): SLURM settings of the tasks of
:func:`~diffusion_attribution.core.jobs.run_tasks`, checked before anything runs.

Its keys, defaults and precedence are those listed in :mod:`diffusion_attribution.core.jobs`;
:func:`slurm_settings` applies them for the tasks of one name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

#: Keys of a cluster file (``DA_CLUSTER``) and the types of their values.
CLUSTER_KEYS: dict[str, type | tuple[type, ...]] = {
    "partition": str,
    "account": str,
    "qos": str,
    "mem_gb": (int, float),
    "cpus_per_task": int,
    "gpus_per_task": int,
    "time_min": int,
    "array_parallelism": int,
    "python": str,
    "setup": list,
    "overrides": dict,
}
_NOT_NEGATIVE = ("gpus_per_task",)
_POSITIVE = ("mem_gb", "cpus_per_task", "time_min", "array_parallelism")


def _check_settings(values: object, where: str, allowed: Mapping[str, Any]) -> dict:
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    unknown = sorted(str(k) for k in values if k not in allowed)
    if unknown:
        raise ValueError(
            f"{where}: unknown key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )
    for key, value in values.items():
        kind = allowed[key]
        names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{where}: {key} must be {names}, got {value!r}")
        if key in _POSITIVE and value <= 0 or key in _NOT_NEGATIVE and value < 0:
            raise ValueError(f"{where}: {key} must be {'> 0' if key in _POSITIVE else '>= 0'}")
        if key == "setup" and not all(isinstance(c, str) for c in value):
            raise ValueError(f"{where}: setup must be a list of shell commands (strings)")
    return dict(values)


def load_cluster(path: str | Path) -> dict:
    """The settings of cluster file ``path`` (format: :mod:`diffusion_attribution.core.jobs`),
    checked: raises one ``ValueError`` naming an unknown key (and the allowed ones) or a value
    of the wrong type."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cluster file {path} (DA_CLUSTER) does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    values = _check_settings(values, str(path), CLUSTER_KEYS)
    per_name = {k: v for k, v in CLUSTER_KEYS.items() if k != "overrides"}
    for name, over in values.get("overrides", {}).items():
        values["overrides"][name] = _check_settings(over, f"{path}: overrides.{name}", per_name)
    return values


def slurm_settings(name: str, cluster: str | Path | None = None) -> dict:
    """The SLURM settings of tasks called ``name``: the cluster file (``cluster``, default
    ``DA_CLUSTER``) with ``overrides[name]`` applied, then the ``DA_SLURM_*`` variables."""
    cluster = cluster if cluster is not None else os.environ.get("DA_CLUSTER")
    values = load_cluster(cluster) if cluster else {}
    out = {"cpus_per_task": 1, "gpus_per_task": 0, "time_min": 240, "setup": []}
    out.update({k: v for k, v in values.items() if k != "overrides"})
    out.update(values.get("overrides", {}).get(name, {}))
    env = {
        "DA_SLURM_PARTITION": ("partition", str),
        "DA_SLURM_TIME_MIN": ("time_min", int),
        "DA_SLURM_GPUS": ("gpus_per_task", int),
    }
    for var, (key, kind) in env.items():
        if os.environ.get(var):
            try:
                out[key] = kind(os.environ[var])
            except ValueError:
                raise ValueError(
                    f"{var} must be {kind.__name__}, got {os.environ[var]!r}"
                ) from None
    return out
