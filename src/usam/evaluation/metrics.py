"""Segmentation metrics the way the benchmarks compute them: mIoU and COCO mask mAP50.

``SemanticIoU`` accumulates one confusion matrix over the whole dataset (not a
mean of per-image scores), 255 ignored. A class that appears in neither
prediction nor ground truth has no IoU at all (its union is empty), so it is
reported as None and left out of the mean instead of dragging it down. Two
protocols, by what the dataset labels:

- with a background class (VOC-21, COCO painted from instances): background is
  label 0 and one of the averaged classes;
- without one (ADE20K's 150 classes, where 0 is unlabelled and read as ignore):
  the mean runs over the named classes only. A pixel no kept mask covers is
  predicted "no class": it is a miss for its true class (that class's false
  negatives and union grow) and never a class of its own.

``MaskAP50`` is COCO's mask AP at IoU 0.5 computed by pycocotools' ``COCOeval``
itself (its 101 float64 recall points, its matching): every image counts,
including those without ground truth, whose detections are false positives;
crowd regions are ``iscrowd`` (a detection on one is neither a hit nor a false
positive); at most 100 detections per image and class count (COCO keeps the
highest-scoring ones); the mean runs over classes with ground truth.

Units: mIoU and per-class IoU in percent (as VOC tables print them), mAP50 as
a fraction in [0, 1] (as COCO tools print it).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.classification import MulticlassConfusionMatrix

from usam.core.labels import BACKGROUND, IGNORE, MAX_CLASSES
from usam.data.ground_truth import GroundTruth

COCO_MAX_DETECTIONS = 100  # per image and class, as in COCO's AP


@dataclass
class SemanticScores:
    miou: float  # percent, over the classes that occur; NaN when none does
    per_class: dict[str, float | None]  # percent; None when the class is not scored


@dataclass
class MaskAPScores:
    map50: float  # fraction; NaN when no image has a ground-truth instance
    per_class: dict[str, float | None] | None  # None unless asked for; None where no ground truth


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    if not 0 < len(classes) <= MAX_CLASSES:
        raise ValueError(
            f"{len(classes)} classes; these metrics take 1..{MAX_CLASSES} "
            f"(labels are stored as uint8 with {IGNORE} = ignore)"
        )
    return tuple(classes)


def _as_long(array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array)).long()


class SemanticIoU:
    """Dataset-level mIoU; maps use 0 = background (or no class), ``i + 1`` = class ``i``
    and 255 = ignore (ground truth only).

    ``background_class=False`` is the protocol of datasets without a background
    class (ADE20K): background is then neither reported nor averaged, and a
    pixel predicted 0 counts against its true class.
    """

    def __init__(self, classes: Sequence[str], *, background_class: bool = True) -> None:
        self.classes = _check_classes(classes)
        if BACKGROUND in self.classes:
            raise ValueError(f"'{BACKGROUND}' is implicit (label 0); remove it from the class list")
        self.background_class = background_class
        self.names = (BACKGROUND, *self.classes)
        self.metric = MulticlassConfusionMatrix(
            num_classes=len(self.names),
            ignore_index=IGNORE,
            validate_args=False,
            sync_on_compute=False,  # fed by the one process that sees every image
        )

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        prediction, target = _as_long(prediction), _as_long(target)
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(prediction.shape)} and ground truth {tuple(target.shape)} "
                "differ in shape; predict at the ground truth's resolution"
            )
        top = len(self.classes)
        if prediction.numel() and (prediction.min() < 0 or prediction.max() > top):
            raise ValueError(
                f"prediction values must lie in 0..{top}, got {prediction.unique().tolist()}"
            )
        bad = target[(target > top) & (target != IGNORE)]
        if bad.numel() or (target.numel() and target.min() < 0):
            raise ValueError(
                f"ground truth values must lie in 0..{top} or be {IGNORE}; got "
                f"{target.unique().tolist()}: was it read with another class list?"
            )
        if not self.background_class and (target == 0).any():
            raise ValueError(
                "ground truth holds background (0) but this protocol has no background class; "
                "score it with background_class=True or read 0 as ignore"
            )
        self.metric.update(prediction.flatten(), target.flatten())

    def compute(self) -> SemanticScores:
        confusion = self.metric.confmat.double()  # rows: ground truth, columns: prediction
        hits = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - hits
        scored = [self.background_class, *[True] * len(self.classes)]
        per_class = {
            name: float(100 * hit / size) if keep and size > 0 else None
            for name, hit, size, keep in zip(self.names, hits, union, scored)
        }
        present = [v for v in per_class.values() if v is not None]
        miou = sum(present) / len(present) if present else math.nan
        return SemanticScores(miou=miou, per_class=per_class)

    def reset(self) -> None:
        self.metric.reset()


def _rles(masks: np.ndarray) -> list[dict[str, Any]]:
    """pycocotools RLEs of (N, H, W) bool masks."""
    if not len(masks):
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def _coco_index(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates its indexing
        coco.createIndex()
    return coco


class MaskAP50:
    """COCO mask AP at IoU 0.5 over per-image predicted instances and ground truth."""

    def __init__(self, classes: Sequence[str], *, per_class: bool = False) -> None:
        self.classes = _check_classes(classes)
        self.per_class = per_class
        self.reset()

    def update(
        self, masks: np.ndarray, labels: Sequence[int], scores: Sequence[float], truth: GroundTruth
    ) -> None:
        """``masks`` (N, H, W) bool at the ground truth's size; ``labels`` 0-based."""
        shape = tuple(truth.semantic.shape)
        masks = np.asarray(masks, dtype=bool)
        masks = masks.reshape(0, *shape) if masks.size == 0 else masks
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if masks.ndim != 3 or tuple(masks.shape[1:]) != shape:
            raise ValueError(
                f"predicted masks have shape {tuple(masks.shape)}; expected (N, {shape[0]}, "
                f"{shape[1]}) to match the ground truth"
            )
        if not len(masks) == len(labels) == len(scores):
            raise ValueError(f"{len(masks)} masks, {len(labels)} labels and {len(scores)} scores")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(
                f"labels must lie in 0..{len(self.classes) - 1}, got {np.unique(labels).tolist()}"
            )
        image_id = len(self._images) + 1
        self._images.append({"id": image_id, "height": shape[0], "width": shape[1]})
        truths = np.array([i.mask for i in truth.instances], dtype=bool).reshape(-1, *shape)
        for instance, rle in zip(truth.instances, _rles(truths)):
            self._objects += not instance.iscrowd
            self._add(self._truths, image_id, instance.label, rle, iscrowd=int(instance.iscrowd))
        for label, score, rle in zip(labels, scores, _rles(masks)):
            self._add(self._detections, image_id, label, rle, score=float(score))

    @staticmethod
    def _add(annotations: list, image_id: int, label: int, rle: dict, **fields: Any) -> None:
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(label) + 1,
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                **fields,
            }
        )

    def compute(self) -> MaskAPScores:
        per_class = dict.fromkeys(self.classes) if self.per_class else None
        if self._objects == 0:
            return MaskAPScores(math.nan, per_class)
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.classes)]
        truths, detections = (
            _coco_index({"images": self._images, "annotations": a, "categories": categories})
            for a in (self._truths, self._detections)
        )
        evaluator = COCOeval(truths, detections, iouType="segm")
        evaluator.params.iouThrs = np.array([0.5])
        evaluator.params.areaRng, evaluator.params.areaRngLbl = [[0, 1e10]], ["all"]
        evaluator.params.maxDets = [COCO_MAX_DETECTIONS]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        precision = evaluator.eval["precision"][0, :, :, 0, 0]  # (recall points, classes)
        if per_class is not None:
            for name, column in zip(self.classes, precision.T):
                per_class[name] = float(column.mean()) if (column > -1).all() else None
        return MaskAPScores(float(precision[precision > -1].mean()), per_class)

    def reset(self) -> None:
        self._images: list[dict[str, Any]] = []
        self._truths: list[dict[str, Any]] = []
        self._detections: list[dict[str, Any]] = []
        self._objects = 0
