from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from usam.sweep import SweepFileError, multirun_overrides

from helpers.commands import ROOT, compose_config

SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))


def test_the_paper_ablations_have_sweeps():
    names = {p.stem for p in SWEEPS}
    assert {"teacher_top_k", "student_uncertainty", "head_input_view", "data_source"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_files_are_valid_wandb_grids_that_compose(path, tmp_path, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] == "grid" and sweep["metric"]["goal"] in ("maximize", "minimize")
    assert sweep["command"][:4] == ["${env}", "python", "-m", "usam.fit"]
    assert sweep["command"][-1] == "${args_no_hyphens}"
    monkeypatch.setenv("USAM_TEACHER_CKPT", str(tmp_path / "teacher.ckpt"))
    overrides = multirun_overrides(sweep, str(path))
    fixed = overrides[: -len(sweep["parameters"])]
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"]
    for key, spec in sweep["parameters"].items():
        for value in spec["values"]:
            cfg = compose_config("fit", [*fixed, f"{key}={value}", *paths])
            if key != "experiment":
                assert str(OmegaConf.select(cfg, key)) == str(value)
            assert "eval" in cfg.callbacks and cfg.eval_data.name == "voc_val"
            if "teacher_ckpt" in " ".join(fixed):
                assert cfg.teacher_ckpt == str(tmp_path / "teacher.ckpt")


def test_only_grid_sweeps_translate():
    with pytest.raises(SweepFileError, match="only grid"):
        multirun_overrides({"method": "bayes"}, "x.yaml")
    with pytest.raises(SweepFileError, match="command must run"):
        multirun_overrides({"method": "grid", "command": ["python", "train.py"]}, "x.yaml")


def test_a_two_point_sweep_runs_as_a_hydra_multirun(tmp_path):
    sweep = {
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"model.teacher.top_k": {"values": [0.1, 3]}},
        "command": [
            "${env}",
            "python",
            "-m",
            "usam.fit",
            "data=synthetic",
            "stage=teacher",
            "${args_no_hyphens}",
        ],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "usam.sweep",
            str(path),
            f"paths.root_dir={tmp_path}",
            "data.classes=[cat,dog]",
            "data.synthetic.images_per_class=4",
            "logger=none",
            "++trainer.fast_dev_run=true",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={tmp_path}/multirun",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "multirun").glob("[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job, top_k in zip(jobs, ("0.1", "3")):
        assert (job / "checkpoints" / "teacher" / "final.ckpt").is_file()
        assert f"top_k: {top_k}" in (job / "config.yaml").read_text()
