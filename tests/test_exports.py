"""Exports read back by the project's own readers: YOLO-seg polygons reproduce their masks,
and no export carries an instance without pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from usam.data.eval_datasets import YOLOSegmentation, load_ground_truth
from usam.inference.exports import Annotation, coco_instances, polygon_of, save_yolo

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLASSES = ("cat", "dog", "car")


def _annotation(masks: np.ndarray, labels, key: str = "image", classes=CLASSES) -> Annotation:
    masks = np.asarray(masks, dtype=bool)
    rles = []
    for mask in masks:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rles.append({"size": rle["size"], "counts": rle["counts"].decode()})
    height, width = masks.shape[1:]
    return Annotation(
        key=key,
        height=height,
        width=width,
        rles=rles,
        labels=np.asarray(labels, dtype=np.int64),
        names=[classes[i] for i in labels],
        scores=np.linspace(0.9, 0.5, len(labels)),
        semantic=np.zeros((height, width), np.uint8),
    )


def _read_back(annotations: list[Annotation], root: Path, classes=CLASSES) -> dict:
    """Write YOLO-seg labels (and blank images of the right size) under ``root`` and read
    every image's instance masks back through the YOLO-seg reader, by key."""
    for annotation in annotations:
        image = Image.new("RGB", (annotation.width, annotation.height))
        image.save(root / "images" / "val" / f"{annotation.key}.png")
        save_yolo(annotation, root / "labels" / "val" / f"{annotation.key}.txt")
    source = YOLOSegmentation(root, "val", list(classes))
    labels = {a.key: a.labels.tolist() for a in annotations}
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
    read = _read_back([_annotation(mask[None], [1])], yolo_root)["image"]
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
    annotation = _annotation(np.stack(masks), [i % 3 for i in range(len(masks))])
    read = _read_back([annotation], yolo_root)["image"]
    assert len(read) == len(masks)
    for got, mask in zip(read, masks):
        np.testing.assert_array_equal(got, mask)


def test_instances_without_pixels_are_in_no_export(yolo_root):
    full = np.zeros((8, 8), bool)
    full[2:5, 2:6] = True
    annotation = _annotation(np.stack([full, np.zeros((8, 8), bool), full]), [0, 1, 2])
    assert annotation.labels.tolist() == [0, 2] and annotation.names == ["cat", "car"]
    assert annotation.scores.tolist() == pytest.approx([0.9, 0.5])
    result = annotation.to_result("image.png")
    assert [i["area"] for i in result["instances"]] == [12, 12]
    document = coco_instances([result], CLASSES)
    assert [a["category_id"] for a in document["annotations"]] == [1, 3]
    save_yolo(annotation, yolo_root / "image.txt")
    assert [line.split()[0] for line in (yolo_root / "image.txt").read_text().splitlines()] == [
        "0",
        "2",
    ]
    nothing = _annotation(np.zeros((1, 8, 8), bool), [1])
    assert nothing.rles == [] and nothing.to_result("x.png")["instances"] == []


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not on this machine")
def test_coco128_instances_survive_a_yolo_round_trip(yolo_root):
    source = YOLOSegmentation(SHARED_DATA / "coco128-seg", "train2017")
    annotations, originals = [], {}
    for index in range(len(source)):
        loaded = source.load(index)
        truth = load_ground_truth(loaded.ground_truth)
        masks = np.array([i.mask for i in truth.instances], bool).reshape(-1, *truth.semantic.shape)
        labels = [i.label for i in truth.instances]
        annotations.append(_annotation(masks, labels, loaded.key, source.classes))
        originals[loaded.key] = masks
    read = _read_back(annotations, yolo_root, source.classes)
    ious = []
    for key, masks in originals.items():
        assert len(read[key]) == len(masks), key
        for got, mask in zip(read[key], masks):
            ious.append((got & mask).sum() / (got | mask).sum())
    assert len(ious) > 900
    assert np.median(ious) >= 0.97
    assert min(ious) == 1.0  # corner outlines reproduce the masks exactly
