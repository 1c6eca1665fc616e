"""Exports read back by the project's own readers: YOLO-seg polygons reproduce their masks,
the per-image results round-trip, and no export carries an instance without pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from usam.data.eval_datasets import YOLOSegmentation, load_ground_truth
from usam.inference.exports import (
    LabelledImage,
    coco_instances,
    read_result,
    save_yolo,
    write_result,
)
from usam.inference.polygons import part_polygons, polygon_of
from usam.inference.predictor import Prediction

from helpers.review_exports import prediction_of

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLASSES = ("cat", "dog", "car")


def _read_back(predictions: list[Prediction], root: Path, classes=CLASSES) -> dict:
    """Write YOLO-seg labels (and blank images of the right size) under ``root`` and read
    every image's instance masks back through the YOLO-seg reader, by key."""
    for prediction in predictions:
        image = Image.new("RGB", (prediction.width, prediction.height))
        image.save(root / "images" / "val" / f"{prediction.key}.png")
        save_yolo(prediction, root / "labels" / "val" / f"{prediction.key}.txt")
    source = YOLOSegmentation(root, "val", list(classes))
    labels = {p.key: p.labels.tolist() for p in predictions}
    read = {}
    for index in range(len(source)):
        loaded = source.load(index)
        truth = load_ground_truth(loaded.ground_truth)
        assert [i.label for i in truth.instances] == labels[loaded.key]
        read[loaded.key] = [i.mask for i in truth.instances]
    return read


@pytest.fixture
def yolo_root(tmp_path) -> Path:
    for folder in ("images", "labels"):
        (tmp_path / folder / "val").mkdir(parents=True)
    return tmp_path


def test_a_square_round_trips_exactly_with_corners_on_pixel_boundaries(yolo_root):
    mask = np.zeros((20, 20), bool)
    mask[3:13, 4:14] = True  # 10 x 10
    assert polygon_of(mask).tolist() == [[4, 3], [14, 3], [14, 13], [4, 13]]
    read = _read_back([prediction_of(mask[None], [1])], yolo_root)["image"]
    assert len(read) == 1 and read[0].sum() == 100
    np.testing.assert_array_equal(read[0], mask)


def test_any_mask_round_trips_exactly(yolo_root):
    """Holes, several parts, parts touching at a corner, pixels on the image border."""
    rng = np.random.default_rng(0)
    masks = [rng.random((23, 31)) < density for density in (0.1, 0.3, 0.5, 0.7, 0.9)]
    ring = np.zeros((23, 31), bool)
    ring[2:20, 3:25] = True
    ring[6:15, 8:18] = False  # a hole
    ring[9:12, 11:14] = True  # an island in the hole
    diagonal = np.eye(23, 31, dtype=bool) | np.eye(23, 31, k=5, dtype=bool)[::-1]
    masks += [ring, diagonal, np.ones((23, 31), bool)]
    prediction = prediction_of(np.stack(masks), [i % 3 for i in range(len(masks))])
    read = _read_back([prediction], yolo_root)["image"]
    assert len(read) == len(masks)
    for got, mask in zip(read, masks):
        np.testing.assert_array_equal(got, mask)


def test_instances_without_pixels_are_in_no_export(yolo_root, tmp_path):
    full = np.zeros((8, 8), bool)
    full[2:5, 2:6] = True
    prediction = prediction_of(np.stack([full, np.zeros((8, 8), bool), full]), [0, 1, 2])
    prediction = prediction.with_pixels()
    assert prediction.labels.tolist() == [0, 2] and prediction.mask_indices.tolist() == [0, 2]
    assert prediction.scores.tolist() == pytest.approx([0.9, 0.5])
    assert prediction.entropies.tolist() == pytest.approx([0.1, 0.3])
    assert prediction.uncertainty() == pytest.approx(0.2)
    write_result(LabelledImage("image.png", prediction), CLASSES, tmp_path / "image.json")
    image = read_result(tmp_path / "image.json")
    assert image.file_name == "image.png" and image.prediction.rles == prediction.rles
    for field in ("labels", "scores", "entropies", "mask_indices"):
        np.testing.assert_array_equal(getattr(image.prediction, field), getattr(prediction, field))
    document = coco_instances([image], CLASSES)
    assert [a["category_id"] for a in document["annotations"]] == [1, 3]
    assert [a["area"] for a in document["annotations"]] == [12, 12]
    assert document["images"][0]["uncertainty"] == pytest.approx(0.2)
    save_yolo(prediction, yolo_root / "image.txt")
    assert [line.split()[0] for line in (yolo_root / "image.txt").read_text().splitlines()] == [
        "0",
        "2",
    ]
    nothing = prediction_of(np.zeros((1, 8, 8), bool), [1]).with_pixels()
    assert nothing.rles == [] and nothing.uncertainty() == 1.0  # nothing found: a person must
    assert coco_instances([LabelledImage("x.png", nothing)], CLASSES)["annotations"] == []


def test_each_connected_part_gets_an_exact_outline():
    mask = np.zeros((20, 24), bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False  # a hole stays inside its part's outline
    mask[12:16, 12:15] = True  # touches the first part at a corner only: one 8-connected part
    mask[16:19, 18:23] = True  # a part of its own
    polygons = part_polygons(mask)
    assert len(polygons) == 2
    drawn = []
    for polygon in polygons:
        flat = [float(v) for v in polygon.flatten()]
        rle = mask_utils.merge(mask_utils.frPyObjects([flat], 20, 24))
        drawn.append(mask_utils.decode(rle).astype(bool))
    assert not (drawn[0] & drawn[1]).any()
    np.testing.assert_array_equal(drawn[0] | drawn[1], mask)


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not on this machine")
def test_coco128_instances_survive_a_yolo_round_trip(yolo_root):
    source = YOLOSegmentation(SHARED_DATA / "coco128-seg", "train2017")
    predictions, originals = [], {}
    for index in range(len(source)):
        loaded = source.load(index)
        truth = load_ground_truth(loaded.ground_truth)
        masks = np.array([i.mask for i in truth.instances], bool).reshape(-1, *truth.semantic.shape)
        labels = [i.label for i in truth.instances]
        predictions.append(prediction_of(masks, labels, loaded.key))
        originals[loaded.key] = masks
    read = _read_back(predictions, yolo_root, source.classes)
    ious = []
    for key, masks in originals.items():
        assert len(read[key]) == len(masks), key
        for got, mask in zip(read[key], masks):
            ious.append((got & mask).sum() / (got | mask).sum())
    assert len(ious) > 900
    assert np.median(ious) >= 0.97
    assert min(ious) == 1.0  # corner outlines reproduce the masks exactly
