"""Per-command help: the options each command reads, with their comments, required first, and
without loading torch (so it answers at once)."""

from __future__ import annotations

import pytest
import yaml

from usam.cli import CONF_DIR
from usam.command_help import command_help

from helpers.commands import run_python

COMMANDS = ("fit", "eval", "extract", "generate", "ingest", "annotate")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_key_of_the_command_with_its_comment(command):
    shown = command_help(command, CONF_DIR)
    entry = yaml.safe_load((CONF_DIR / f"{command}.yaml").read_text())
    for key in entry:
        if key not in ("defaults", "task_name", "run_name"):
            assert f"\n  {key}=" in shown, key
    for group in (g for d in entry["defaults"] if isinstance(d, dict) for g in d):
        if group not in ("hydra", "paths") and not group.startswith("override"):
            assert f"\n{group}=" in shown, group


def test_annotate_help_puts_required_keys_first_and_says_what_they_take(tmp_path):
    shown = run_python("-m", "usam.annotate", "--help", cwd=tmp_path)
    assert shown.returncode == 0
    sections = shown.stdout.split("\n\n")
    assert sections[1].splitlines()[0] == "required:"
    assert [line.split("=")[0].strip() for line in sections[1].splitlines()[1:]] == [
        "images",
        "ckpt",
        "out",
    ]
    assert "one image, a folder (searched recursively) or a glob pattern" in sections[1]
    groups = [line.split("=")[0] for line in shown.stdout.splitlines() if "  (one of:" in line]
    assert groups == ["sam", "amg", "extract", "inference"]  # no fit-only groups
    inference = yaml.safe_load((CONF_DIR / "inference" / "default.yaml").read_text())
    assert f"inference.confidence_threshold={inference['confidence_threshold']}" in shown.stdout


def test_help_and_version_do_not_load_torch(tmp_path):
    probe = (
        "import runpy, sys; sys.argv = ['usam.fit', '--help'];"
        "runpy.run_module('usam.fit', run_name='__main__');"
        "sys.argv = ['usam.fit', '--version']; runpy.run_module('usam.fit', run_name='__main__');"
        "print('torch loaded:', 'torch' in sys.modules)"
    )
    shown = run_python("-c", probe, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[-1] == "torch loaded: False"
    assert "usam.fit: what it reads" in shown.stdout and "\nusam 0" in shown.stdout
