"""Segmentation metrics the way the benchmarks compute them: VOC mIoU and COCO mask mAP50.

``SemanticIoU`` accumulates one confusion matrix over the whole dataset (not a
mean of per-image scores), background included as in VOC-21, 255 ignored.
torchmetrics reports 0 for a class that appears in neither prediction nor
ground truth (its union is empty); such a class has no IoU at all, so it is
reported as None and left out of the mean instead of dragging it down.

``MaskAP50`` is COCO's mask AP at IoU 0.5 through torchmetrics (pycocotools
underneath): crowd regions are ``iscrowd`` (a detection on one is neither a hit
nor a false positive), at most 100 detections per image and class count
(COCO keeps the highest-scoring ones), and the mean runs over classes with
ground truth.

Units: mIoU and per-class IoU in percent (as VOC tables print them), mAP50 as
a fraction in [0, 1] (as COCO tools print it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.detection import MeanAveragePrecision

from usam.core.labels import BACKGROUND, IGNORE, MAX_CLASSES
from usam.data.ground_truth import GroundTruth


@dataclass
class SemanticScores:
    miou: float  # percent, over the classes that occur; NaN when none does
    per_class: dict[str, float | None]  # percent; None when the class never occurs


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
    """Dataset-level mIoU over background + ``classes``; maps use 0 = background,
    ``i + 1`` = class ``i`` and 255 = ignore (ground truth only)."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = _check_classes(classes)
        if BACKGROUND in self.classes:
            raise ValueError(f"'{BACKGROUND}' is implicit (label 0); remove it from the class list")
        self.names = (BACKGROUND, *self.classes)
        self.metric = MulticlassJaccardIndex(
            num_classes=len(self.names),
            ignore_index=IGNORE,
            average=None,
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
        self.metric.update(prediction.flatten(), target.flatten())

    def compute(self) -> SemanticScores:
        confmat = self.metric.confmat
        if not confmat.any():
            return SemanticScores(math.nan, dict.fromkeys(self.names))
        iou = self.metric.compute()
        occurs = (confmat.sum(0) + confmat.sum(1)) > 0
        per_class = {
            name: float(100 * value) if present else None
            for name, value, present in zip(self.names, iou.tolist(), occurs.tolist())
        }
        present = [v for v in per_class.values() if v is not None]
        miou = sum(present) / len(present) if present else math.nan
        return SemanticScores(miou=miou, per_class=per_class)

    def reset(self) -> None:
        self.metric.reset()


def _instance_target(truth: GroundTruth) -> dict[str, torch.Tensor]:
    height, width = truth.semantic.shape
    masks = [torch.as_tensor(np.asarray(i.mask, dtype=bool)) for i in truth.instances]
    return {
        "masks": torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool),
        "labels": torch.tensor([i.label for i in truth.instances], dtype=torch.long),
        "iscrowd": torch.tensor([int(i.iscrowd) for i in truth.instances], dtype=torch.long),
    }


class MaskAP50:
    """COCO mask AP at IoU 0.5 over per-image predicted instances and ground truth."""

    def __init__(self, classes: Sequence[str], *, per_class: bool = False) -> None:
        self.classes = _check_classes(classes)
        self.per_class = per_class
        # pycocotools' summary reads AP at 100 detections whatever else it is given,
        # so COCO's cap of 100 stays; callers cap their detections before this.
        self.metric = MeanAveragePrecision(
            iou_type="segm",
            iou_thresholds=[0.5],
            class_metrics=per_class,
            sync_on_compute=False,  # fed by the one process that sees every image
        )
        self.metric.warn_on_many_detections = False  # the cap is documented behaviour here
        self._detections = 0
        self._objects = 0

    def update(
        self, masks: np.ndarray, labels: Sequence[int], scores: Sequence[float], truth: GroundTruth
    ) -> None:
        """``masks`` (N, H, W) bool at the ground truth's size; ``labels`` 0-based."""
        shape = tuple(truth.semantic.shape)
        masks = np.asarray(masks, dtype=bool)
        masks = torch.as_tensor(masks.reshape(0, *shape) if masks.size == 0 else masks)
        labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
        scores = torch.as_tensor(np.asarray(scores, dtype=np.float32)).reshape(-1)
        if masks.ndim != 3 or tuple(masks.shape[1:]) != shape:
            raise ValueError(
                f"predicted masks have shape {tuple(masks.shape)}; expected (N, {shape[0]}, "
                f"{shape[1]}) to match the ground truth"
            )
        if not len(masks) == len(labels) == len(scores):
            raise ValueError(f"{len(masks)} masks, {len(labels)} labels and {len(scores)} scores")
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(
                f"labels must lie in 0..{len(self.classes) - 1}, got {labels.unique().tolist()}"
            )
        target = _instance_target(truth)
        self._detections += len(masks)
        self._objects += int((target["iscrowd"] == 0).sum())
        self.metric.update(
            [{"masks": masks, "labels": labels, "scores": scores}],
            [target],
        )

    def compute(self) -> MaskAPScores:
        per_class = dict.fromkeys(self.classes) if self.per_class else None
        if self._objects == 0:
            return MaskAPScores(math.nan, per_class)
        if self._detections == 0:  # torchmetrics says -1 here; COCO's answer is 0
            return MaskAPScores(0.0, per_class)
        result = self.metric.compute()
        if per_class is not None:
            values = result["map_per_class"].reshape(-1).tolist()
            for label, value in zip(result["classes"].reshape(-1).tolist(), values):
                per_class[self.classes[label]] = value if value >= 0 else None
        return MaskAPScores(float(result["map"]), per_class)

    def reset(self) -> None:
        self.metric.reset()
        self._detections = 0
        self._objects = 0
