from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from usam.commands.fit import run
from usam.formats.embedding_shards import read_manifest
from usam.images.image_sets import MissingImageSetError
from usam.images.stable_diffusion import GenerationError
from usam.inference.predictor import load_head
from usam.sam.checkpoints import CheckpointError

from helpers.commands import CONF_DIR, ROOT, TINY_TEACHER_FIT, compose_config, run_overrides
from helpers.wandb_runs import offline_record

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_all_paper_experiments_exist():
    assert {"demo", "voc_sd", "voc_wc", "coco_sd", "coco_wc", "voc_superclasses"} <= set(
        EXPERIMENTS
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, tmp_path):
    cfg = compose_config(
        "fit",
        [
            f"experiment={experiment}",
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path}/run",
        ],
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["sam_model_type"] == resolved["sam"]["model_type"]
    assert resolved["data"]["embed_dim"] == 1024
    assert resolved["stage"] in ("teacher", "student", "both")
    expected_source = {"sd": "sd", "wc": "web", "superclasses": "sd", "demo": "sd"}
    assert resolved["data"]["source"] == expected_source[experiment.split("_")[-1]]
    if experiment.startswith("coco"):
        assert resolved["data"]["classes"] == "coco80"


def test_cfg_job_prints_the_composed_config():
    result = subprocess.run(
        [sys.executable, "-m", "usam.fit", "experiment=voc_sd", "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "classes: voc20" in result.stdout and "model_type: vit_h" in result.stdout


def test_fast_dev_run_both_stages(tmp_path, capsys):
    cfg = compose_config(
        "fit",
        run_overrides(tmp_path, tmp_path / "data", "logger=csv", "++trainer.fast_dev_run=true"),
    )
    checkpoints = run(cfg)
    assert set(checkpoints) == {"teacher", "student"}
    for stage, path in checkpoints.items():
        assert path.is_file() and path.parent.name == stage
        assert load_head(path).metadata.provenance.random_weights
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    assert (tmp_path / "data" / "shards").is_dir()  # synthetic shards written on first use

    student_only = compose_config(
        "fit",
        run_overrides(
            tmp_path / "again",
            tmp_path / "data",
            "logger=csv",
            "callbacks=none",
            "trainer.max_epochs=1",
            "trainer.log_every_n_steps=1",
            "stage=student",
            f"teacher_ckpt={checkpoints['teacher']}",
        ),
    )
    assert set(run(student_only)) == {"student"}
    metrics = tmp_path / "again" / "run" / "csv" / "student" / "version_0" / "metrics.csv"
    header = metrics.read_text().splitlines()[0]
    assert "train/uncertainty" in header and "val/image_acc" in header
    assert not list((tmp_path / "again" / "run").rglob("epoch=*.ckpt"))  # callbacks=none


def test_wandb_offline_run_is_marked_random_weights(tmp_path):
    cfg = compose_config(
        "fit", run_overrides(tmp_path, tmp_path / "data", "stage=teacher", "trainer.max_epochs=1")
    )
    checkpoints = run(cfg)
    assert checkpoints["teacher"].is_file()
    markers = (b"not_meaningful_because", b"val/random_weights", b"random-weights")
    record = offline_record(tmp_path / "run" / "wandb", *markers)  # the log synced later
    for marker in markers:
        assert marker in record


def test_student_stage_without_teacher_fails_clearly(tmp_path):
    cfg = compose_config(
        "fit", run_overrides(tmp_path, tmp_path / "data", "logger=none", "stage=student")
    )
    with pytest.raises(ValueError, match="teacher_ckpt="):
        run(cfg)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        # SAM is checked before hours of image generation start
        (["experiment=voc_sd"], CheckpointError, r"sam_vit_h_4b8939\.pth.*sam\.checkpoint"),
        (["experiment=voc_sd", "sam=tiny"], GenerationError, "generate.model=/path/to/dir"),
        (["experiment=voc_wc"], MissingImageSetError, r"data.source=web: .* usam.ingest"),
    ],
)
def test_missing_inputs_say_what_to_do(tmp_path, overrides, error, message):
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", "logger=none"]
    with pytest.raises(error, match=message):
        run(compose_config("fit", [*overrides, *paths]))
    assert not list(tmp_path.rglob("*.tar"))  # no image or embedding shard was started


def test_class_names_to_trained_head_on_tiny_models(tmp_path):
    """fit alone: tiny SD images -> tiny SAM shards -> teacher, every step cached."""
    overrides = [
        *TINY_TEACHER_FIT,
        "generate.per_class=3",
        "sam=tiny",
        "amg.points_per_side=4",
        "extract.val_fraction=0.34",
        "extract.images_per_shard=2",
        f"paths.root_dir={tmp_path}",
        f"paths.data_dir={tmp_path}/data",
        f"paths.output_dir={tmp_path}/run",
        f"paths.cache_dir={tmp_path}/cache",
    ]
    checkpoints = run(compose_config("fit", overrides))
    sets = list((tmp_path / "data" / "shards").iterdir())
    assert len(sets) == 1 and sets[0].name.startswith("custom-")
    train, val = (read_manifest(sets[0] / split) for split in ("train", "val"))
    assert train.num_images + val.num_images == 6 and val.num_images >= 1
    assert train.images_random_weights and train.sam["random_weights"]
    meta = load_head(checkpoints["teacher"]).metadata
    assert meta.provenance == train.provenance  # the head carries its data's reasons
    assert dataclasses.asdict(meta.mask_settings) == train.config["amg"]
    assert meta.mask_settings.points_per_side == 4
    assert meta.mask_settings.proposals == "one_per_point"  # the paper's reading by default
    assert train.num_masks == 16 * train.num_images  # N = 4 x 4 points for every image
    stamp = sorted(p.stat().st_mtime_ns for p in (sets[0] / "train").iterdir())
    run(
        compose_config("fit", [*overrides, f"paths.output_dir={tmp_path}/run2"])
    )  # cached: nothing redone
    assert stamp == sorted(p.stat().st_mtime_ns for p in (sets[0] / "train").iterdir())


def test_ddp_on_two_cpu_processes(tmp_path):
    """Lightning DDP (gloo) end to end: both stages finish and write their checkpoints."""
    overrides = run_overrides(
        tmp_path,
        tmp_path / "data",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "logger=csv",
    )
    result = subprocess.run(
        [sys.executable, "-m", "usam.fit", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("teacher", "student"):
        assert (tmp_path / "run" / "checkpoints" / stage / "last.ckpt").is_file()
    assert result.stdout.count("RANDOM WEIGHTS") == 2  # rank zero only: banner and ending
    printed = result.stdout + result.stderr
    for chatter in ("GPU available", "litlogger", "LeafSpec", "module(s) in eval mode"):
        assert chatter not in printed, chatter  # known third-party notes are silenced


def test_demo_runs_the_whole_pipeline_into_one_run_directory(tmp_path, capsys):
    """experiment=demo, shrunk: tiny SD -> tiny SAM -> teacher -> student -> real-photo eval."""
    cfg = compose_config(
        "fit",
        [
            "experiment=demo",
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path}/run",
            f"paths.cache_dir={tmp_path}/cache",
            "generate.per_class=1",
            "amg.points_per_side=4",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "extract.trainer.enable_progress_bar=false",
            "callbacks.eval.every_n_epochs=1",
            "extract.val_fraction=0.3",
        ],
    )
    checkpoints = run(cfg)
    run_dir = tmp_path / "run"
    assert set(checkpoints) == {"teacher", "student"}
    assert all(path.is_relative_to(run_dir) for path in checkpoints.values())
    assert (run_dir / "data" / "images").is_dir() and (run_dir / "data" / "shards").is_dir()
    # the final head on the real photo, in a folder named by the checkpoint that was tested
    final = run_dir / "eval" / "student" / f"test-{checkpoints['student'].stem}"
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["images"] == 1 and metrics["meaningful"] is False
    assert len(list((final / "overlays").glob("*.png"))) == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # one per stage
    printed = capsys.readouterr().out
    ending = printed[printed.index("usam.fit finished") :].splitlines()
    header = ["stage", "tested", "checkpoint", "mIoU", "mAP50", "mAP50-95", "image", "acc"]
    assert ending[1].split() == header
    student = next(line.split() for line in ending if line.split()[:1] == ["student"])
    assert student[1] == str(checkpoints["student"].relative_to(run_dir))
    assert float(student[2]) == pytest.approx(metrics["mIoU"], abs=0.01)
    assert float(student[4]) == pytest.approx(metrics["mAP50-95"], abs=1e-4)
    assert any(str(final) in line for line in ending)
    assert "RANDOM WEIGHTS" in ending[-1]
