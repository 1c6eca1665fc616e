"""Mask AP and mIoU against the reference implementations, on hand cases and the real subsets.

The references are in ``helpers.metric_references``: pycocotools' ``COCOeval`` as COCO
runs it for mask AP, with ground truth built here from the datasets' own files (YOLO-seg
polygons as COCO polygons, VOC instances as OpenCV's 8-connected components of each
class), and VOC's mIoU from a numpy confusion matrix. ADE20K's 150-class protocol has its
own numpy reference over the raw annotation PNGs below.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from usam.data.eval_datasets import ADE20K, VOCSegmentation, YOLOSegmentation, load_ground_truth
from usam.data.ground_truth import GroundTruth, Instance
from usam.evaluation.metrics import MaskAP, SemanticIoU, metric_collection
from usam.inference.semantic_map import semantic_from_instances

from helpers.metric_cases import METRIC_CLASSES, random_images
from helpers.metric_references import coco_image, coco_reference, rle, voc_miou

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data is not on this machine"
)


def usam_ap(images: list[dict], truths: list[GroundTruth], classes) -> tuple[dict, dict]:
    metric = MaskAP(classes)
    for image, truth in zip(images, truths):
        detections = image["detections"]
        shape = (image["height"], image["width"])
        masks = np.array([d[0] for d in detections], bool).reshape(-1, *shape)
        metric.update(masks, [d[1] for d in detections], [d[2] for d in detections], truth)
    scores = metric.compute()
    per_class = {name: scores[f"ap50/{name}"] for name in classes}
    overall = {name: scores[name] for name in ("mAP50-95", "mAP50")}
    return overall, {k: None if np.isnan(v) else v for k, v in per_class.items()}


# ---------------------------------------------------------------- hand cases

SHAPE = (20, 20)


def _cell(index: int) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    top, left = 5 * (index // 4), 5 * (index % 4)
    mask[top : top + 4, left : left + 4] = True
    return mask


def _hand(truths: list[list[np.ndarray]], detections: list[list[tuple]]) -> list[dict]:
    return [
        {
            "height": SHAPE[0],
            "width": SHAPE[1],
            "truths": [(rle(mask), 0) for mask in image_truths],
            "detections": image_detections,
        }
        for image_truths, image_detections in zip(truths, detections)
    ]


def _hand_truths(truths: list[list[np.ndarray]]) -> list[GroundTruth]:
    return [GroundTruth(np.zeros(SHAPE, np.uint8), [Instance(m, 0) for m in t]) for t in truths]


def test_recall_of_exactly_k_percent_keeps_its_recall_point():
    # 3 of 5 objects found at precision 1: recall 0.6 exactly, so the points 0, ..., 0.60
    # count (61 of 101); float32 recall points would drop 0.60, which lies above 3/5
    objects = [_cell(i) for i in range(5)]
    truths = [objects]
    images = _hand(truths, [[(objects[i], 0, 0.9 - 0.1 * i) for i in range(3)]])
    reference, _ = coco_reference(images, 1)
    assert reference["mAP50"] == pytest.approx(61 / 101, abs=1e-12)
    assert usam_ap(images, _hand_truths(truths), ["cat"])[0] == pytest.approx(reference, abs=1e-6)


def test_false_positives_on_images_without_ground_truth_count():
    # a perfect hit at 0.5 on one image, a false positive at 0.9 on an empty one
    objects = [_cell(0)]
    truths = [objects, []]
    images = _hand(truths, [[(objects[0], 0, 0.5)], [(_cell(5), 0, 0.9)]])
    reference, _ = coco_reference(images, 1)
    assert reference["mAP50"] == pytest.approx(0.5, abs=1e-12)
    assert usam_ap(images, _hand_truths(truths), ["cat"])[0] == pytest.approx(reference, abs=1e-6)


def test_map50_95_counts_each_iou_threshold_a_detection_clears():
    # IoU 0.72 (72 of 100 pixels, inside): a hit at 0.50, ..., 0.70 (5 of 10 thresholds);
    # a second object found exactly (IoU 1) on another image is a hit at all ten
    inside = np.zeros(SHAPE, bool)
    inside[:9, :8] = True
    square = np.zeros(SHAPE, bool)
    square[:10, :10] = True
    truths = [[square], [_cell(5)]]
    images = _hand(truths, [[(inside, 0, 0.9)], [(_cell(5), 0, 0.8)]])
    reference, _ = coco_reference(images, 1)
    # to 0.70 both are hits: AP 1. Above, the 0.9 detection is a false positive ranked
    # first and the exact one a hit: precision 1/2 up to recall 1/2, so AP 51 / 101 / 2
    assert reference["mAP50"] == pytest.approx(1.0, abs=1e-12)
    assert reference["mAP50-95"] == pytest.approx((5 + 5 * 25.5 / 101) / 10, abs=1e-12)
    assert usam_ap(images, _hand_truths(truths), ["cat"])[0] == pytest.approx(reference, abs=1e-6)


def _region(top: int, bottom: int, left: int, right: int) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[top:bottom, left:right] = True
    return mask


def test_crowd_regions_match_coco_eval():
    """On a crowd (iscrowd=1), a detection's IoU is its share inside the region: it is
    ignored (neither hit nor false positive) where that share clears the threshold, however
    many detections land there; elsewhere, or on another class's crowd, it is a false
    positive; a class whose only ground truth is a crowd has no AP."""
    cat_crowd, dog_crowd = _region(10, 20, 0, 10), _region(10, 20, 10, 20)
    first_truths = [(_cell(0), 0), (_cell(2), 0), (cat_crowd, 0, True), (dog_crowd, 1, True)]
    first_detections = [
        (_region(12, 16, 2, 8), 0, 0.95),  # inside the cat crowd: ignored
        (_cell(0), 0, 0.9),  # a hit
        (_region(15, 19, 3, 12), 0, 0.85),  # 28 of 36 pixels in the crowd: ignored to IoU 0.75
        (_region(6, 12, 2, 8), 0, 0.8),  # a third in the crowd: a false positive
        (_cell(2), 0, 0.7),  # a hit
        (_region(12, 18, 12, 18), 0, 0.6),  # a cat on the dog crowd: a false positive
        (_region(12, 18, 12, 18), 1, 0.9),  # a dog on the dog crowd: ignored
    ]
    second_crowd = _region(0, 10, 0, 20)  # an image whose only object is a crowd
    second_detections = [(_region(2, 6, 2, 10), 0, 0.92), (_region(14, 18, 14, 18), 0, 0.75)]
    raw = [(first_truths, first_detections), ([(second_crowd, 0, True)], second_detections)]
    images = [
        {
            "height": SHAPE[0],
            "width": SHAPE[1],
            "truths": [(rle(mask), label, *crowd) for mask, label, *crowd in truths],
            "detections": detections,
        }
        for truths, detections in raw
    ]
    reference, reference_per_class = coco_reference(images, 2)
    # by score, crowd matches left out: hit, FP, FP, hit, FP: precision 1 up to recall 1/2,
    # then 1/2 (51 + 50 / 2 of 101 points); from IoU 0.80 the 0.85 detection is a false
    # positive too, so 2/5 past recall 1/2 (51 + 50 * 2 / 5)
    assert reference["mAP50"] == pytest.approx(76 / 101, abs=1e-12)
    assert reference["mAP50-95"] == pytest.approx((6 * 76 + 4 * 71) / 1010, abs=1e-12)
    assert reference_per_class.tolist() == pytest.approx([76 / 101, -1.0], abs=1e-12)
    truths = [
        GroundTruth(np.zeros(SHAPE, np.uint8), [Instance(m, label, bool(c)) for m, label, *c in t])
        for t, _ in raw
    ]
    overall, per_class = usam_ap(images, truths, ["cat", "dog"])
    assert overall == pytest.approx(reference, abs=1e-6)
    assert per_class == {"cat": pytest.approx(reference_per_class[0], abs=1e-6), "dog": None}


def test_the_collection_matches_both_references_on_random_images_with_crowds():
    images = random_images()
    assert sum(i.iscrowd for image in images for i in image["truth"].instances) >= 2
    collection = metric_collection(METRIC_CLASSES)
    for image in images:
        collection.update(**image)
    scores = collection.compute()
    coco = [
        coco_image(image["truth"], image["masks"], image["labels"], image["scores"])
        for image in images
    ]
    reference, reference_per_class = coco_reference(coco, len(METRIC_CLASSES))
    assert {name: scores[name] for name in reference} == pytest.approx(reference, abs=1e-6)
    for name, expected in zip(METRIC_CLASSES, reference_per_class):
        assert scores[f"ap50/{name}"] == pytest.approx(expected, abs=1e-6), name
    maps = [(image["semantic"], image["truth"].semantic) for image in images]
    miou, ious = voc_miou(maps, len(METRIC_CLASSES))
    assert scores["mIoU"] == pytest.approx(miou, abs=1e-6)
    for name, expected in zip(("background", *METRIC_CLASSES), ious):
        assert scores[f"iou/{name}"] == pytest.approx(expected, abs=1e-6, nan_ok=True), name


# ---------------------------------------------------------------- perturbed predictions


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by (dy, dx), pixels pushed off the edge lost (no wrap-around)."""
    height, width = mask.shape
    moved = np.zeros_like(mask)
    moved[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = mask[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return moved


def perturbed(
    instances: list[Instance], shape: tuple[int, int], num_classes: int, rng
) -> list[tuple[np.ndarray, int, float]]:
    """Detections from ground truth: drops, jitter around IoU 0.5, duplicates, wrong classes,
    false positives (at least one on an image without objects)."""
    detections = []
    for instance in instances:
        if rng.random() < 0.15:
            continue  # missed
        ys, xs = np.nonzero(instance.mask)
        span = max(int(np.ptp(ys)), int(np.ptp(xs)), 1)
        reach = int(rng.integers(0, max(span // 3, 1) + 1))
        mask = _shift(instance.mask, reach * int(rng.choice([-1, 1])), int(rng.integers(-2, 3)))
        label = int(rng.integers(num_classes)) if rng.random() < 0.1 else instance.label
        detections.append((mask, label, float(rng.random())))
        if rng.random() < 0.2:  # a duplicate, usually scored lower
            detections.append((instance.mask, instance.label, float(rng.random())))
    for _ in range(int(rng.poisson(1.0)) + (not instances)):
        mask = np.zeros(shape, bool)
        top, left = int(rng.integers(0, shape[0] - 8)), int(rng.integers(0, shape[1] - 8))
        mask[top : top + int(rng.integers(4, 80)), left : left + int(rng.integers(4, 80))] = True
        detections.append((mask, int(rng.integers(num_classes)), float(rng.random())))
    return detections


@pytest.mark.integration
@needs_data
def test_map50_equals_coco_eval_on_coco128_predictions():
    source = YOLOSegmentation(SHARED_DATA / "coco128-seg", "train2017")
    rng = np.random.default_rng(0)
    images, truths = [], []
    for index in range(len(source)):
        loaded = source.load(index)
        width, height = loaded.image.size
        truth = load_ground_truth(loaded.ground_truth)
        label_file = SHARED_DATA / "coco128-seg" / "labels" / "train2017"
        label_file = label_file / f"{Path(source.images[index]).stem}.txt"
        polygons = []
        if label_file.is_file():
            for line in label_file.read_text().splitlines():
                values = line.split()
                points = np.array(values[1:], float).reshape(-1, 2) * [width, height]
                polygons.append(([points.ravel().tolist()], int(values[0])))
        detections = perturbed(truth.instances, (height, width), len(source.classes), rng)
        images.append(
            {"height": height, "width": width, "truths": polygons, "detections": detections}
        )
        truths.append(truth)
    assert sum(not image["truths"] for image in images) == 2  # the pure-background images
    assert sum(len(image["truths"]) for image in images) == sum(len(t.instances) for t in truths)
    reference, reference_per_class = coco_reference(images, len(source.classes))
    overall, per_class = usam_ap(images, truths, source.classes)
    # the perturbations leave something to get right, more at the stricter thresholds
    assert 0.05 < reference["mAP50-95"] < reference["mAP50"] - 0.05 < 0.9
    assert overall == pytest.approx(reference, abs=1e-6)
    for name, expected in zip(source.classes, reference_per_class):
        got = per_class[name]
        assert (got is None) == (expected == -1), name
        if got is not None:
            assert got == pytest.approx(expected, abs=1e-6), name


def _components(class_map: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """8-connected components of each VOC class (void and background skipped)."""
    found = []
    for value in range(1, 21):
        count, labels = cv2.connectedComponents(
            (class_map == value).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
        )
        found += [(labels == number, value - 1) for number in range(1, count)]
    return found


@pytest.mark.integration
@needs_data
def test_map50_equals_coco_eval_on_voc_mini_predictions():
    root = SHARED_DATA / "voc2012-mini"
    source = VOCSegmentation(root, "trainval")
    rng = np.random.default_rng(1)
    images, truths = [], []
    for index, image_id in enumerate(source.ids):
        truth = load_ground_truth(source.load(index).ground_truth)
        with Image.open(root / "SegmentationClass" / f"{image_id}.png") as png:
            class_map = np.array(png)
        components = _components(class_map)
        assert len(components) == len(truth.instances), image_id
        height, width = class_map.shape
        images.append(
            {
                "height": height,
                "width": width,
                "truths": [(rle(mask), label) for mask, label in components],
                "detections": perturbed(truth.instances, (height, width), 20, rng),
            }
        )
        truths.append(truth)
    reference, _ = coco_reference(images, 20)
    overall, _ = usam_ap(images, truths, source.classes)
    # low: jitter undoes the many tiny derived components
    assert 0.1 < reference["mAP50"] < 0.95 and reference["mAP50-95"] < reference["mAP50"]
    assert overall == pytest.approx(reference, abs=1e-6)


# ---------------------------------------------------------------- ADE20K mIoU


def ade_miou(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """ADE20K's mIoU: raw annotations (0 unlabelled, 1..150) against predictions (0 = no
    class, a miss), one confusion matrix, averaged over the 150 classes that occur."""
    confusion = np.zeros((151, 151), np.int64)
    for prediction, raw in pairs:
        labelled = raw > 0
        pixels = raw[labelled].astype(np.int64) * 151 + prediction[labelled]
        confusion += np.bincount(pixels, minlength=151 * 151).reshape(151, 151)
    hits = np.diag(confusion)[1:]
    union = (confusion.sum(0) + confusion.sum(1))[1:] - hits
    return float(np.mean(100 * hits[union > 0] / union[union > 0]))


@pytest.mark.integration
@needs_data
def test_ade20k_miou_follows_the_150_class_protocol():
    root = SHARED_DATA / "ade20k-val100"
    source = ADE20K(root, "validation")
    rng = np.random.default_rng(2)
    kernel = np.ones((5, 5), np.uint8)
    metric = SemanticIoU(source.classes, background_class=False)
    with_background = SemanticIoU(source.classes)  # the old reading: uncovered = a class
    pairs = []
    for index in range(len(source)):
        truth = load_ground_truth(source.load(index).ground_truth)
        assert not truth.background_class
        masks, labels = [], []
        for instance in truth.instances:
            if rng.random() < 0.1:
                continue  # missed: its pixels stay uncovered
            masks.append(cv2.erode(instance.mask.astype(np.uint8), kernel).astype(bool))
            wrong = rng.random() < 0.1
            labels.append(int(rng.integers(150)) if wrong else instance.label)
        scores = rng.random(len(labels))
        prediction = semantic_from_instances(
            np.array(masks, bool).reshape(-1, *truth.semantic.shape),
            labels,
            scores,
            truth.semantic.shape,
        )
        with Image.open(root / source.masks[index]) as png:
            raw = np.array(png)
        pairs.append((prediction, raw))
        metric.update(prediction, truth)
        with_background.update(prediction, truth)
    reference = ade_miou(pairs)
    scores = metric.compute()
    assert scores["mIoU"] == pytest.approx(reference, abs=1e-6)
    per_class = [key for key in scores if key.startswith("iou/")]
    assert np.isnan(scores["iou/background"]) and len(per_class) == 151
    # background as a 151st class with IoU 0 pulls the mean below the protocol's
    assert with_background.compute()["mIoU"] < reference - 0.1
