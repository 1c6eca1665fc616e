"""The SAM+CLIP baseline with a tiny random open_clip model (real BPE tokenizer) on the tiny-SAM
VOC set: pooled images (the masked whole image or its box), batching, the shared
Predictor/metrics path, the command, weight errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from usam.commands.eval import (
    run,  # the one entry point: baseline=sam_clip dispatches to the baseline
)
from usam.core.config import ConfigError, settings_from_config
from usam.evaluation.clip_baseline import (
    ClipSettings,
    ClipWeightsError,
    clip_predictor,
    load_clip,
    masked_views,
)
from usam.evaluation.scoring import evaluate
from usam.formats.embedding_shards import ImageRecord, iter_records
from usam.inference.predictor import InferenceSettings, Predictor

from helpers.commands import TINY_EVAL, compose_config
from helpers.evaluation import GRID, direct

TINY_CLIP = "usam-test-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SMALL = [
    *TINY_EVAL,
    "sweep.confidence_thresholds=[0.05,0.1]",
    "sweep.nms_ious=[0.5]",
    "num_overlays=1",
]
LOW = InferenceSettings(confidence_threshold=0.06, nms_iou=0.5)  # 20 classes: 1/20 = 0.05


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A random CLIP small enough for CPU tests, registered with open_clip by name."""
    import open_clip

    path = tmp_path_factory.mktemp("clip") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return TINY_CLIP


def spec(model: str, batch_size: int = 64, view: str = "masked_image") -> ClipSettings:
    """Random weights: no pretrained tag, no checkpoint."""
    return ClipSettings(model, pretrained=None, view=view, batch_size=batch_size)


def test_pooled_images_are_the_mask_times_the_whole_image_or_its_box():
    image = np.random.default_rng(0).integers(1, 255, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), np.uint8, order="F")
    mask[4:9, 10:25] = 1
    mask[6, 10:14] = 0  # a hole: zeroed in the crop
    rle = mask_utils.encode(mask)["counts"].decode()
    none = np.zeros((2, 1))
    record = ImageRecord("k", 20, 30, none, none, none, none, none, none, rles=[rle, rle])
    pooled = [np.asarray(i) for i in masked_views(image, record, "masked_image")]
    assert len(pooled) == 2 and pooled[0].shape == (20, 30, 3)  # the paper's pooled image
    np.testing.assert_array_equal(pooled[0], image * mask[..., None])
    crops = [np.asarray(c) for c in masked_views(image, record, "masked_crop")]
    assert len(crops) == 2 and crops[0].shape == (5, 15, 3)
    np.testing.assert_array_equal(crops[0], pooled[0][4:9, 10:25])
    assert (crops[0][2, :4] == 0).all() and (crops[0][0] > 0).all()
    with pytest.raises(ValueError, match="baseline.clip.view='box' is not one of"):
        next(masked_views(image, record, "box"))


def test_baseline_flows_through_the_same_predictor_and_metrics(voc_set, tiny_clip):
    source, directory = voc_set
    predictor = clip_predictor(spec(tiny_clip), source, LOW)
    assert isinstance(predictor, Predictor) and predictor.classes == list(source.classes)
    assert predictor.checkpoint.provenance.reasons == ("an untrained CLIP",)
    assert predictor.checkpoint.sam_model_type is None  # CLIP names any SAM's masks
    record = next(iter_records(directory))
    probs = predictor.mask_probabilities(record)
    assert probs.shape == (record.num_masks, 21) and (probs[:, 0] == 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert probs[:, 1:].max() > LOW.confidence_threshold  # something survives the threshold
    small_batches = clip_predictor(spec(tiny_clip, batch_size=3), source, LOW)
    np.testing.assert_allclose(small_batches.mask_probabilities(record), probs, atol=1e-5)
    evaluation = evaluate(directory, predictor, sweep=GRID)
    _, scores = direct(directory, predictor)
    assert evaluation.images == 2 and evaluation.detections > 0
    assert evaluation.scores == pytest.approx(scores, nan_ok=True)
    assert evaluation.provenance.reasons == (
        "an untrained CLIP",
        "evaluation masks: an untrained SAM (tiny)",
    )
    strict = clip_predictor(spec(tiny_clip), source, InferenceSettings(confidence_threshold=0.7))
    assert evaluate(directory, strict).detections == 0  # the paper's threshold: none this sure


def test_the_crop_view_shows_clip_other_pixels(voc_set, tiny_clip):
    source, directory = voc_set
    record = next(iter_records(directory))
    pooled = clip_predictor(spec(tiny_clip), source, LOW).mask_probabilities(record)
    cropped = clip_predictor(spec(tiny_clip, view="masked_crop"), source, LOW)
    assert cropped.view == "masked_crop"
    probs = cropped.mask_probabilities(record)
    assert probs.shape == pooled.shape and (probs[:, 0] == 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert np.abs(probs - pooled).max() > 1e-3


def test_the_settings_name_a_misspelt_key_and_a_bad_value():
    with pytest.raises(ConfigError, match="unknown key baseline.clip.templat; did you mean "):
        settings_from_config(ClipSettings, {"templat": "{}"}, "baseline.clip")
    with pytest.raises(ConfigError, match="baseline.clip.view='crop'"):
        settings_from_config(ClipSettings, {"view": "crop"}, "baseline.clip")
    with pytest.raises(ConfigError, match="baseline.clip.batch_size=0 must be at least 1"):
        settings_from_config(ClipSettings, {"batch_size": 0}, "baseline.clip")


def test_command_scores_the_baseline(voc_set, tiny_clip, tmp_path, caplog):
    source, directory = voc_set
    overrides = [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
        *SMALL,
        f"eval_data.source.root={source.root}",
        f"eval_data.shards_dir={directory.parent}",
        "baseline=sam_clip",
    ]
    default = compose_config("eval", overrides)
    assert default.inference.confidence_threshold == 0.7  # the paper's threshold
    assert default.baseline.clip.pretrained == "openai"
    assert default.baseline.clip.view == "masked_image"  # the paper's pooled images
    cfg = compose_config(
        "eval",
        [
            *overrides,
            f"baseline.clip.model={tiny_clip}",
            "baseline.clip.pretrained=null",
            "inference.confidence_threshold=0.06",
        ],
    )
    with caplog.at_level(logging.WARNING, logger="usam.core.provenance"):
        summary = run(cfg)
    assert "because of: an untrained CLIP; evaluation masks: an untrained SAM" in caplog.text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    assert metrics["baseline"] == "sam_clip" and metrics["detections"] > 0
    assert metrics["inference"]["confidence_threshold"] == 0.06
    assert metrics["clip"]["view"] == "masked_image"
    expected = evaluate(directory, clip_predictor(spec(tiny_clip), source, LOW))
    assert metrics["mIoU"] == pytest.approx(expected.scores["mIoU"])


def test_missing_weights_say_what_to_set(tmp_path):
    # offline (conftest sets HF_HUB_OFFLINE=1): the download fails before any model is built
    with pytest.raises(
        ClipWeightsError,
        match=r"ViT-B-16 \(pretrained tag 'openai'\).*"
        r"baseline\.clip\.checkpoint=",
    ):
        load_clip("ViT-B-16", "openai")
    with pytest.raises(ClipWeightsError, match="does not exist; fix baseline.clip.checkpoint"):
        load_clip("ViT-B-16", "openai", tmp_path / "missing.bin")
    with pytest.raises(ClipWeightsError, match="no pretrained tag 'nope' for ViT-B-16"):
        load_clip("ViT-B-16", "nope")
    with pytest.raises(ClipWeightsError, match="unknown open_clip model 'ViT-X'"):
        load_clip("ViT-X")
