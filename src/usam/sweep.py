"""Run a W&B sweep file as a Hydra multirun: one definition of each ablation, two runners.

``usam-sweep teacher_top_k [extra overrides]`` (a sweep shipped with usam, by name; the
files are in ``usam/sweeps/``, ``experiments/sweeps/`` in a clone) or
``python -m usam.sweep my_sweep.yaml`` (any sweep file) reads the sweep's fixed overrides
(its ``command`` between ``usam.fit`` and ``${args_no_hyphens}``) and its grid
(``parameters``: ``values`` lists or single ``value``s) and runs ``python -m usam.fit -m``
over the same grid, for people without W&B. Only grid sweeps translate; other methods
need the W&B agent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from usam.core.errors import UsageError

ENTRY = "usam.fit"
ARGS = "${args_no_hyphens}"
PACKAGED = Path(__file__).resolve().parent / "sweeps"


class SweepFileError(UsageError, ValueError):
    """A sweep file this runner cannot translate."""


def _value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def multirun_overrides(sweep: dict[str, Any], where: str) -> list[str]:
    """The Hydra overrides of a W&B grid sweep: fixed ones first, then the swept ones."""
    if sweep.get("method") != "grid":
        raise SweepFileError(f"{where}: method {sweep.get('method')!r}; only grid sweeps translate")
    command = [str(part) for part in sweep.get("command", [])]
    if ENTRY not in command or ARGS not in command:
        raise SweepFileError(f"{where}: the command must run `-m {ENTRY} ... {ARGS}`")
    fixed = command[command.index(ENTRY) + 1 : command.index(ARGS)]
    swept = []
    for key, spec in (sweep.get("parameters") or {}).items():
        if "values" in spec:
            swept.append(f"{key}={','.join(_value(v) for v in spec['values'])}")
        elif "value" in spec:
            swept.append(f"{key}={_value(spec['value'])}")
        else:
            raise SweepFileError(f"{where}: parameter {key} needs 'values' or 'value' for a grid")
    return fixed + swept


def sweep_file(name: str) -> Path:
    """A sweep file's path (relative to the current folder, or absolute), else the sweep
    shipped with usam under that name: ``teacher_top_k``, or a path such as the README's
    ``experiments/sweeps/teacher_top_k.yaml`` given from a folder that has no copy of it."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGED / (path.name if path.suffix == ".yaml" else f"{name}.yaml")
    if packaged.is_file():
        return packaged
    names = ", ".join(p.stem for p in sorted(PACKAGED.glob("*.yaml")))
    raise SweepFileError(f"no sweep file {name}; the sweeps shipped with usam: {names}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    try:
        path = sweep_file(args[0])
        if path != Path(args[0]):
            print(f"{args[0]} is the sweep shipped with usam: {path}")
        overrides = multirun_overrides(yaml.safe_load(path.read_text()), str(path))
    except SweepFileError as error:
        print(f"usam.sweep: error: {error}", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", ENTRY, "-m", *overrides, *args[1:]]
    print(" ".join(command[1:]))
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
