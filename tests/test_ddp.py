from __future__ import annotations

import json
import subprocess

import lightning as L
import pytest

from usam.formats.embedding_shards import read_manifest
from usam.inference.predictor import load_head
from usam.train.lightning_modules import TeacherModule

from helpers.commands import ROOT, run_python
from helpers.official_amg import photo_folder
from helpers.shards import SMALL_CLASSES, synthetic_datamodule
from helpers.wandb_runs import offline_record


def test_two_cpu_ranks_get_disjoint_equal_batches_and_reduced_metrics(shard_sets, tmp_path):
    result = run_python(
        str(ROOT / "tests" / "ddp_probe.py"), str(shard_sets["train"].parent), str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["epochs"]) == len(ranks[1]["epochs"]) == 2
    for epoch in range(2):
        batches = [rank["epochs"][epoch] for rank in ranks]
        assert len(batches[0]) == len(batches[1]) > 0  # in step: same number of batches
        assert [len(b) for b in batches[0]] == [len(b) for b in batches[1]]
        keys = [{key for batch in rank_batches for key in batch} for rank_batches in batches]
        assert not keys[0] & keys[1]  # disjoint images
    # validation metrics are reduced over both ranks' images: equal on every rank and
    # equal to one process validating the same head on the whole validation set
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    module = TeacherModule.load_from_checkpoint(tmp_path / "head.ckpt")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    single = trainer.validate(module, datamodule=synthetic_datamodule(shard_sets), verbose=False)
    for name in ("val/loss", "val/image_acc"):
        assert ranks[0]["metrics"][name] == pytest.approx(single[0][name], rel=1e-5)


# usam.fit on two CPU ranks from class names of synthetic shards: one teacher epoch
TWO_RANK_FIT = [
    "data=synthetic",
    f"data.classes=[{','.join(SMALL_CLASSES)}]",
    "data.batch_size=8",
    "stage=teacher",
    "trainer=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def _varint(value: int) -> bytes:
    encoded = b""
    while True:
        low, value = value & 0x7F, value >> 7
        encoded += bytes([low | (0x80 if value else 0)])
        if not value:
            return encoded


def _config_value(record: bytes, key: str) -> object:
    """The value an offline W&B run's config holds for ``key``: W&B writes each item as a
    protobuf ``ConfigItem``, the key as field 1 and the value's JSON as field 16."""
    item = b"\n" + _varint(len(key)) + key.encode() + b"\x82\x01"
    start = record.rindex(item) + len(item)
    length = shift = 0
    while True:
        byte = record[start]
        start += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return json.loads(record[start : start + length])


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "error:" in line]


@pytest.mark.parametrize("logger", ["wandb", pytest.param("csv", marks=pytest.mark.slow)])
def test_two_rank_fit_from_a_folder_finishes_with_its_logger(logger, tmp_path):
    """Rank 1's W&B logger is Lightning's stand-in: the config goes to rank zero's run."""
    extra = [] if logger == "wandb" else ["logger=csv"]
    result = run_python("-m", "usam.fit", *TWO_RANK_FIT, *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _error_lines(result) == []
    (run_dir,) = (tmp_path / "outputs" / "fit" / "synthetic-tiny").iterdir()
    assert not run_dir.name.startswith("failed-")
    teacher = run_dir / "checkpoints" / "teacher"
    assert (teacher / "last.ckpt").is_file()
    assert list(load_head(teacher / "last.ckpt").metadata.classes) == SMALL_CLASSES
    if logger == "csv":
        assert (run_dir / "csv" / "teacher" / "version_0" / "metrics.csv").is_file()
        assert not (run_dir / "wandb").exists()
        return
    keys = ("paths.output_dir", "trainer.strategy", "trainer.devices", "data.classes")
    record = offline_record(run_dir / "wandb", *(key.encode() for key in keys))  # one run
    assert _config_value(record, "paths.output_dir") == str(run_dir)
    assert _config_value(record, "trainer.strategy") == "ddp"
    assert _config_value(record, "trainer.devices") == 2
    assert _config_value(record, "data.classes") == SMALL_CLASSES


def test_a_user_error_every_rank_meets_is_one_line_once(tmp_path):
    """One validation shard for two ranks, the shard sets inside the run folder as in the
    demo: rank zero reports and sets the folder aside; rank 1, which met the same error or
    then misses the moved shards, says nothing."""
    result = run_python(
        *("-m", "usam.fit", *TWO_RANK_FIT, "logger=csv", "data.synthetic.images_per_class=3"),
        "paths.data_dir=${paths.output_dir}/data",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = _error_lines(result)
    assert "Traceback" not in result.stderr
    (run_dir,) = (tmp_path / "outputs" / "fit" / "synthetic-tiny").iterdir()
    assert run_dir.name.startswith("failed-")
    started_as = run_dir.name.removeprefix("failed-")
    assert line.startswith(f"usam.fit: error: {run_dir.parent / started_as}/data/shards/"), line


def test_two_rank_extract_from_a_folder_reports_once_and_lists_every_shard(tmp_path):
    photo_folder(tmp_path / "photos", count=5)
    result = run_python(
        *("-m", "usam.extract", "source=folder", "source.root=photos", "data.classes=[cat,dog]"),
        *("out_dir=shards", "sam=tiny", "amg.points_per_side=4", "extract.images_per_shard=1"),
        *("extract.num_workers=0", "extract.trainer.enable_progress_bar=false"),
        *("extract.trainer.devices=2", "extract.trainer.strategy=ddp"),
        "extract.trainer.accelerator=cpu",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _error_lines(result) == []
    manifest = read_manifest(tmp_path / "shards" / "eval")
    names = sorted(path.name for path in (tmp_path / "shards" / "eval").glob("shard-*.tar"))
    assert [shard["name"] for shard in manifest.shards] == names
    assert {name.split("-")[1] for name in names} == {"r0", "r1"}  # both ranks wrote
    assert manifest.num_images == 5
    assert result.stdout.count("extracting SAM embeddings of 5 images") == 1
    assert result.stdout.count("eval: 5 images") == 1
    (run_dir,) = (tmp_path / "outputs" / "extract").glob("*/*")  # kept: the run succeeded
    assert "extracted 5 images" in (run_dir / "extract.log").read_text()  # both ranks' images


RANK_ONE_BUG = """
import os
import sys

sys.path.insert(0, {folder!r})

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from usam.cli import hydra_command


def run(cfg):
    if os.environ.get("LOCAL_RANK") == "1":  # the rank DDP launched, before it joins
        raise RuntimeError("rank 1 broke")
    L.Trainer(strategy="ddp", devices=2, accelerator="cpu", logger=False).fit(BoringModel())


if __name__ == "__main__":
    hydra_command("fit", "rank_one_bug")()
"""


@pytest.mark.slow
def test_a_bug_on_rank_one_alone_reaches_the_screen_and_the_run_log(tmp_path):
    """Rank zero waits for rank 1, which, after its grace for rank zero to report, reports
    the bug itself: traceback on screen and in fit.log, where a bug's traceback goes."""
    script = tmp_path / "rank_one_bug.py"
    script.write_text(RANK_ONE_BUG.format(folder=str(tmp_path)))
    result = run_python(str(script), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("RuntimeError: rank 1 broke") == 1, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "fit" / "synthetic-tiny").iterdir()
    assert run_dir.name.startswith("failed-")  # kept for the bug
    log = (run_dir / "fit.log").read_text()
    assert "usam.fit failed on DDP local rank 1" in log and "RuntimeError: rank 1 broke" in log
