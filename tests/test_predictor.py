from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from usam.formats.embedding_shards import ImageRecord
from usam.inference.predictor import (
    HeadCheckpointError,
    InferenceSettings,
    Predictor,
    load_head,
    select_instances,
)
from usam.train.lightning_modules import TeacherModule

H = W = 10


def box_rle(x0: int, y0: int, x1: int, y1: int) -> str:
    mask = np.zeros((H, W), dtype=np.uint8, order="F")
    mask[y0:y1, x0:x1] = 1
    return mask_utils.encode(mask)["counts"].decode()


def record_with(rles: list[str], dim: int = 8) -> ImageRecord:
    n = len(rles)
    return ImageRecord(
        key="img",
        height=H,
        width=W,
        embeddings=np.random.default_rng(0).standard_normal((n, dim)).astype(np.float16),
        iou_preds=np.ones(n, np.float32),
        stability=np.ones(n, np.float32),
        boxes=np.zeros((n, 4), np.float32),
        points=np.zeros((n, 2), np.float32),
        multimask=np.zeros(n, np.int8),
        rles=rles,
    )


# masks 0 and 1 overlap with IoU 40/60 = 0.667; mask 2 is disjoint; mask 3 equals mask 2
RLES = [box_rle(0, 0, 5, 10), box_rle(1, 0, 6, 10), box_rle(7, 0, 10, 3), box_rle(7, 0, 10, 3)]
# outputs: background, cat, dog
PROBS = np.array(
    [
        [0.1, 0.8, 0.1],  # cat 0.8
        [0.1, 0.2, 0.7],  # dog 0.7, overlaps mask 0
        [0.6, 0.3, 0.1],  # cat 0.3: below threshold
        [0.05, 0.9, 0.05],  # cat 0.9
    ]
)


def test_threshold_and_class_agnostic_nms():
    prediction = select_instances(record_with(RLES), PROBS, InferenceSettings(0.5, nms_iou=0.5))
    assert prediction.mask_indices.tolist() == [3, 0]  # by score; mask 1 suppressed by mask 0
    assert prediction.labels.tolist() == [0, 0]
    np.testing.assert_allclose(prediction.scores, [0.9, 0.8])
    assert prediction.masks().shape == (2, H, W)


def test_per_class_nms_keeps_overlapping_masks_of_other_classes():
    settings = InferenceSettings(0.5, nms_iou=0.5, nms_per_class=True)
    prediction = select_instances(record_with(RLES), PROBS, settings)
    assert prediction.mask_indices.tolist() == [3, 0, 1]
    assert prediction.labels.tolist() == [0, 0, 1]


def test_nms_iou_threshold_and_cap():
    loose = InferenceSettings(0.5, nms_iou=0.7)  # 0.667 overlap survives
    assert select_instances(record_with(RLES), PROBS, loose).mask_indices.tolist() == [3, 0, 1]
    capped = InferenceSettings(0.0, nms_iou=1.0, max_detections=2)
    assert select_instances(record_with(RLES), PROBS, capped).mask_indices.tolist() == [3, 0]


def test_precomputed_ious_give_the_same_selection():
    from usam.inference.predictor import mask_ious

    record = record_with(RLES)
    ious = mask_ious(record.coco_rles())
    np.testing.assert_allclose(ious[0, 1], 40 / 60)
    for settings in (InferenceSettings(0.5, 0.5), InferenceSettings(0.2, 0.7, nms_per_class=True)):
        direct = select_instances(record, PROBS, settings)
        cached = select_instances(record, PROBS, settings, ious=ious)
        assert direct.mask_indices.tolist() == cached.mask_indices.tolist()


def test_image_without_masks():
    prediction = select_instances(record_with([]), np.zeros((0, 3)), InferenceSettings())
    assert len(prediction.rles) == 0 and prediction.masks().shape == (0, H, W)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"nms_iou": 0.0}, "nms_iou"),
        ({"max_detections": 0}, "max_detections"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InferenceSettings(**kwargs)


@pytest.mark.parametrize("view", ["tokens", "mask_token"])
def test_predictor_from_checkpoint_matches_the_module(tmp_path, view):
    module = TeacherModule(["cat", "dog"], input_view=view, embed_dim=1024, sam_model_type="tiny")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path / "head.ckpt"
    trainer.save_checkpoint(path)
    predictor = Predictor.from_checkpoint(path)
    assert predictor.classes == ["cat", "dog"]
    assert predictor.checkpoint.sam_model_type == "tiny"
    record = record_with(RLES, dim=1024)
    record.multimask = np.array([0, 1, 2, 0], np.int8)
    module.eval()
    with torch.no_grad():
        expected = module(
            torch.from_numpy(record.embeddings), torch.from_numpy(record.multimask)
        ).softmax(-1)
    np.testing.assert_allclose(predictor.mask_probabilities(record), expected.numpy(), rtol=1e-5)
    prediction = predictor(record)
    assert set(prediction.mask_indices.tolist()) <= set(range(4))


def test_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(HeadCheckpointError, match="not a usam head checkpoint"):
        load_head(path)
    with pytest.raises(HeadCheckpointError, match="does not exist"):
        load_head(tmp_path / "missing.ckpt")
