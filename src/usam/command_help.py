"""``python -m usam.<command> --help``: the options that command reads, one line each, taken
from the comments in its config files (the one place they are written), required keys first;
and the comment of one key, for the error that says it is missing.

It reads YAML text only, so it answers in well under a second.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

_KEY_LINE = re.compile(r"^(?P<key>[A-Za-z_][\w.]*):(?P<value>[^#]*?)\s*(?:#\s*(?P<comment>.*))?$")
_HIDDEN_GROUPS = {"hydra", "paths"}  # where runs write: shown as paths.*, not as choices


def _top_level_entries(path: Path) -> list[tuple[str, str, str]]:
    """(key, value, comment) of a config file's unindented keys, in file order."""
    entries = []
    for line in path.read_text().splitlines():
        match = _KEY_LINE.match(line)
        if match and match["key"] not in ("defaults", "_target_", "_convert_"):
            value = match["value"].strip()
            entries.append((match["key"], value or "{...}", (match["comment"] or "").strip()))
    return entries


def _leading_comment(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.startswith("# @package"):
            break
        lines.append(line.lstrip("#").rstrip())
    return lines


def _defaults(path: Path) -> list[tuple[str, Any]]:
    """(group, default choice) of the entry config's defaults list."""
    found = []
    for entry in yaml.safe_load(path.read_text()).get("defaults") or []:
        if isinstance(entry, dict):
            (group, choice), *_ = entry.items()
            if not group.startswith(("override ", "/")):
                found.append((group, choice))
    return found


def _rows(entries: list[tuple[str, str, str]], prefix: str = "") -> list[tuple[str, str]]:
    return [(f"{prefix}{key}={value}", comment) for key, value, comment in entries]


def command_help(config_name: str, conf_dir: Path) -> str:
    entry = conf_dir / f"{config_name}.yaml"
    own = [e for e in _top_level_entries(entry) if e[0] not in ("task_name", "run_name")]
    required = [e for e in own if e[1] == "???"]
    optional = [e for e in own if e[1] != "???"]
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    if required:
        sections.append(("required", _rows(required)))
    sections.append(("options", _rows(optional)))
    for group, choice in _defaults(entry):
        if group in _HIDDEN_GROUPS or group == "_self_":
            continue
        folder = conf_dir / group
        choices = sorted(p.stem for p in folder.glob("*.yaml"))
        title = f"{group}={choice}  (one of: {', '.join(choices)})"
        chosen = folder / f"{choice}.yaml"
        rows = _rows(_top_level_entries(chosen), f"{group}.") if chosen.is_file() else []
        sections.append((title, rows))
    width = max(len(left) for _, rows in sections for left, _ in rows) if sections else 0
    width = min(width, 44)
    lines = [f"usam.{config_name}: what it reads (conf/{config_name}.yaml)"]
    lines += [f"  {line.strip()}" for line in _leading_comment(entry)]
    for title, rows in sections:
        lines += ["", f"{title}:"]
        lines += [f"  {left:<{width}}  {comment}".rstrip() for left, comment in rows]
    lines += [
        "",
        "Set any key as key=value (a group choice as group=name); --cfg job prints the whole",
        "composed config; verbose=true shows tracebacks and third-party messages.",
    ]
    return "\n".join(lines)


def key_comment(key: str, config_name: str, conf_dir: Path, choices: Mapping[str, Any]) -> str:
    """The comment beside ``key`` in the file that sets it: the entry config, or for
    ``group.key`` the group's chosen option (``choices``, from Hydra); '' if none."""
    group, _, name = key.partition(".")
    path = conf_dir / f"{config_name}.yaml"
    if name and choices.get(group):
        path = conf_dir / group / f"{choices[group]}.yaml"
    else:
        name = key
    if not path.is_file():
        return ""
    return next((comment for found, _, comment in _top_level_entries(path) if found == name), "")
