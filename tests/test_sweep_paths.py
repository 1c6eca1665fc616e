"""Which file ``usam.sweep`` reads: a path relative to the folder it is started from, or the
shipped sweep that the README's path names when that folder has no copy of it."""

from __future__ import annotations

import sys

import pytest
import yaml

import usam.sweep as sweep
from usam.sweep import PACKAGED, SweepFileError, sweep_file

README_PATH = "experiments/sweeps/teacher_top_k.yaml"


def _own_sweep(path, top_k: list[int]) -> None:
    """A copy of the shipped teacher sweep with its own grid."""
    spec = yaml.safe_load((PACKAGED / "teacher_top_k.yaml").read_text())
    spec["parameters"]["model.teacher.top_k"]["values"] = top_k
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))


def test_a_path_relative_to_the_current_folder_is_read_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _own_sweep(tmp_path / "mine" / "top_k.yaml", [2, 3])
    _own_sweep(tmp_path / README_PATH, [7])  # a copy where the README's path points
    assert sweep_file("mine/top_k.yaml").resolve() == tmp_path / "mine" / "top_k.yaml"
    assert sweep_file(README_PATH).resolve() == tmp_path / README_PATH  # the copy, not ours
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert sweep_file("../mine/top_k.yaml").resolve() == tmp_path / "mine" / "top_k.yaml"
    with pytest.raises(SweepFileError, match="no sweep file mine/top_k.yaml; the sweeps shipped"):
        sweep_file("mine/top_k.yaml")  # not in this folder, and no sweep ships by that name


def test_the_readme_path_runs_the_shipped_sweep_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sweep_file(README_PATH) == PACKAGED / "teacher_top_k.yaml"
    launched = []
    monkeypatch.setattr(sweep.subprocess, "call", lambda command: launched.append(command) or 0)
    assert sweep.main([README_PATH, "trainer.max_epochs=1"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert (
        shown[0]
        == f"{README_PATH} is the sweep shipped with usam: {PACKAGED / 'teacher_top_k.yaml'}"
    )
    (command,) = launched
    assert command[:4] == [sys.executable, "-m", "usam.fit", "-m"]
    assert "model.teacher.top_k=1,5,0.05,0.1,0.2,0.4" in command
    assert command[-1] == "trainer.max_epochs=1"
