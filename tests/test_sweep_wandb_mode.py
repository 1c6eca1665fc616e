"""The shipped sweeps log to W&B offline, the project default, so that ``usam.sweep``, the
runner for people without W&B, never goes online; USAM_WANDB_OFFLINE=false, which W&B's
agent needs, takes them online."""

from __future__ import annotations

import math

import pytest
import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from usam.sweep import PACKAGED, multirun_overrides

from helpers.commands import compose_config

SWEEPS = sorted(PACKAGED.glob("*.yaml"))


def _jobs(path) -> list[list[str]]:
    """The overrides of every job of the multirun ``usam.sweep`` starts for ``path``, as
    Hydra's sweeper splits them."""
    overrides = multirun_overrides(yaml.safe_load(path.read_text()), str(path))
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _wandb_offline(jobs: list[list[str]], tmp_path) -> set[bool]:
    """``logger.wandb.offline`` as each of ``jobs`` resolves it."""
    places = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"]
    return {compose_config("fit", [*job, *places]).logger.wandb.offline for job in jobs}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_job_of_a_shipped_sweep_logs_offline_unless_told(path, tmp_path, monkeypatch):
    monkeypatch.delenv("USAM_WANDB_OFFLINE", raising=False)
    jobs = _jobs(path)
    grid = yaml.safe_load(path.read_text())["parameters"].values()
    assert len(jobs) == math.prod(len(spec["values"]) for spec in grid)  # no extra sweep
    assert _wandb_offline(jobs, tmp_path) == {True}
    monkeypatch.setenv("USAM_WANDB_OFFLINE", "false")  # what the README gives the W&B agent
    assert _wandb_offline(jobs[:1], tmp_path) == {False}
