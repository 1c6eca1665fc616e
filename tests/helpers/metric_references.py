"""The references usam's metrics are held to, written without usam's metric code.

Mask AP is pycocotools' ``COCOeval(iouType="segm")`` as COCO runs it (default parameters,
detections through ``loadRes``, the first two lines of its summary: AP at IoU 0.50:0.95
and at 0.5, all areas, 100 detections, and the per-class AP at 0.5 from its precision
array). mIoU is VOC's protocol from a numpy confusion matrix: one matrix over the whole
set, background (0) a class like the others, 255 ignored, a class absent from both
ground truth and prediction left out of the mean.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

VOID = 255


def rle(mask: np.ndarray) -> dict:
    """COCO's RLE of an (H, W) bool mask, its counts as text (as in a COCO json file)."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def _annotation(image: dict, image_id: int, truth: tuple, number: int) -> dict:
    """A ground-truth annotation from ``(segmentation, label[, iscrowd])``."""
    segmentation, label, *crowd = truth
    region = (
        segmentation
        if isinstance(segmentation, dict)
        else mask_utils.merge(mask_utils.frPyObjects(segmentation, image["height"], image["width"]))
    )
    return {
        "id": number,
        "image_id": image_id,
        "category_id": label + 1,
        "segmentation": segmentation,
        "area": float(mask_utils.area(region)),
        "iscrowd": int(bool(crowd and crowd[0])),
    }


def coco_image(truth, masks, labels, scores) -> dict:
    """One image of ``coco_reference`` from a ``GroundTruth`` (crowds kept as iscrowd) and
    (N, H, W) detections."""
    height, width = truth.semantic.shape
    return {
        "height": height,
        "width": width,
        "truths": [(rle(i.mask), i.label, i.iscrowd) for i in truth.instances],
        "detections": [(m, int(c), float(s)) for m, c, s in zip(masks, labels, scores)],
    }


def coco_reference(images: list[dict], num_classes: int) -> tuple[dict[str, float], np.ndarray]:
    """COCO's AP at IoU 0.50:0.95 and at 0.5 (-1 without ground truth), and the per-class AP
    at 0.5 (-1 for a class without ground truth).

    ``images``: dicts with ``height``, ``width``, ``truths`` ((segmentation, 0-based label)
    or (segmentation, label, iscrowd)) and ``detections`` ((mask, label, score)).
    """
    gt_images, truths, detections = [], [], []
    for image_id, image in enumerate(images, start=1):
        gt_images.append({"id": image_id, "height": image["height"], "width": image["width"]})
        for truth in image["truths"]:
            truths.append(_annotation(image, image_id, truth, len(truths) + 1))
        for mask, label, score in image["detections"]:
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": label + 1,
                    "segmentation": rle(mask),
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        ground = COCO()
        ground.dataset = {
            "images": gt_images,
            "annotations": truths,
            "categories": [{"id": i + 1} for i in range(num_classes)],
        }
        ground.createIndex()
        # loadRes reads its first entry to tell the result type: it takes no empty list
        results = ground.loadRes(detections) if detections else _no_results(ground)
        evaluator = COCOeval(ground, results, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    params = evaluator.params
    assert params.iouThrs[0] == 0.5 and params.areaRngLbl[0] == "all" and params.maxDets[2] == 100
    precision = evaluator.eval["precision"][0, :, :, 0, 2]
    per_class = np.where((precision > -1).all(0), precision.mean(0), -1.0)
    return {"mAP50-95": float(evaluator.stats[0]), "mAP50": float(evaluator.stats[1])}, per_class


def _no_results(ground: COCO) -> COCO:
    results = COCO()
    results.dataset = {**ground.dataset, "annotations": []}
    results.createIndex()
    return results


def voc_miou(
    maps: Sequence[tuple[np.ndarray, np.ndarray]], num_classes: int
) -> tuple[float, list[float]]:
    """mIoU in percent and the IoU of each of background and the ``num_classes`` classes
    (NaN where a class is in neither prediction nor ground truth), from (prediction,
    ground truth) class maps."""
    size = num_classes + 1
    confusion = np.zeros((size, size), np.int64)
    for prediction, truth in maps:
        scored = truth != VOID
        np.add.at(confusion, (truth[scored].astype(np.int64), prediction[scored]), 1)
    hits = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - hits
    per_class = [100 * h / u if u else math.nan for h, u in zip(hits.tolist(), union.tolist())]
    return float(np.mean(100 * hits[union > 0] / union[union > 0])), per_class
