"""The evaluation metrics: torchmetrics ``Metric``s in one ``MetricCollection``.

Each metric returns named scalars: its headline values (``scalars``, with how they
print) and, when it scores classes one by one, ``<per_class_column>/<class>``.
Every consumer (metrics.json, per_class.csv, the sweep, W&B, the training-time
callback, the end-of-run table of ``fit``, the line ``eval`` prints) iterates over
:data:`METRICS`, so a new metric is one class here, listed there. The scorer hands
each image to the collection as keywords (``semantic``, ``masks``, ``labels``,
``scores``, ``truth``); each metric's ``update`` names the ones it reads.

States are tensors with a ``dist_reduce_fx``, so a metric fed on several ranks
reduces over all their images when computed. Undefined values (a class with no
ground truth) are NaN, written as null or an empty cell.

``SemanticIoU`` accumulates one confusion matrix over the whole dataset (not a
mean of per-image scores), the ignore value of the ground truth's dtype (255 in uint8
maps, 65535 in the uint16 maps of more than 254 classes, :mod:`usam.core.labels`) left
out. A class that appears in neither
prediction nor ground truth has no IoU at all (its union is empty), so it is
left out of the mean instead of dragging it down. Two protocols, by what the
dataset labels:

- with a background class (VOC-21, COCO painted from instances): background is
  label 0 and one of the averaged classes;
- without one (ADE20K's 150 classes, where 0 is unlabelled and read as ignore):
  the mean runs over the named classes only. A pixel no kept mask covers is
  predicted "no class": it is a miss for its true class (that class's false
  negatives and union grow) and never a class of its own.

``MaskAP`` is COCO's mask AP computed by pycocotools' ``COCOeval`` itself: ``mAP50-95``,
COCO's primary metric (the first line of its summary: AP averaged over the IoU
thresholds 0.50, 0.55, ..., 0.95), ``mAP50`` and the per-class AP at IoU 0.5, since
torchmetrics' own differs from that reference (float32 recall points, images
without ground truth skipped): its 101 float64 recall points and its matching;
every image counts, including those without ground truth, whose detections are
false positives; crowd regions are ``iscrowd`` (a detection on one is neither a
hit nor a false positive); at most 100 detections per image and class count
(COCO keeps the highest-scoring ones); the mean runs over classes with ground truth.

Units: mIoU and per-class IoU in percent (as VOC tables print them), AP as a
fraction in [0, 1] (as COCO tools print it).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities.data import dim_zero_cat

from usam.core.labels import BACKGROUND, MAX_CLASSES, ignore_value
from usam.data.ground_truth import GroundTruth

COCO_MAX_DETECTIONS = 100  # per image and class, as in COCO's AP


class EvaluationMetric(Metric):
    """A metric over the images of an evaluation set with a class list.

    ``background_class`` says whether the dataset labels background as a class (its
    protocol); a metric reads it only where that changes the score.
    """

    scalars: ClassVar[dict[str, str]]  # headline name -> how it prints, e.g. "{:.2f}"
    per_class_column: ClassVar[str | None] = None  # the prefix of its per-class scalars
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, classes: Sequence[str], *, background_class: bool = True, **options: Any
    ) -> None:
        super().__init__(**options)
        if not 0 < len(classes) <= MAX_CLASSES:
            raise ValueError(
                f"{len(classes)} classes; these metrics take 1..{MAX_CLASSES} "
                "(labels are stored as uint16 with 65535 = ignore)"
            )
        if BACKGROUND in classes:
            raise ValueError(f"'{BACKGROUND}' is implicit (label 0); remove it from the class list")
        self.classes = tuple(classes)
        self.background_class = background_class

    def _per_class(self, values: dict[str, float]) -> dict[str, float]:
        return {f"{self.per_class_column}/{name}": value for name, value in values.items()}


class SemanticIoU(EvaluationMetric):
    """Dataset-level mIoU of class maps: 0 = background (or no class), ``i + 1`` = class
    ``i``, the dtype's ignore value (ground truth only)."""

    scalars: ClassVar[dict[str, str]] = {"mIoU": "{:.2f}"}
    per_class_column = "iou"

    def __init__(self, classes: Sequence[str], **options: Any) -> None:
        super().__init__(classes, **options)
        size = len(self.classes) + 1
        # rows: ground truth, columns: prediction
        self.add_state("confusion", torch.zeros(size, size, dtype=torch.long), "sum")

    def update(self, semantic: np.ndarray, truth: GroundTruth) -> None:
        prediction = torch.as_tensor(np.asarray(semantic)).long()
        ignore = ignore_value(np.asarray(truth.semantic).dtype)
        target = torch.as_tensor(np.asarray(truth.semantic)).long()
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
        bad = target[(target > top) & (target != ignore)]
        if bad.numel() or (target.numel() and target.min() < 0):
            raise ValueError(
                f"ground truth values must lie in 0..{top} or be {ignore}; got "
                f"{target.unique().tolist()}: was it read with another class list?"
            )
        if not self.background_class and (target == 0).any():
            raise ValueError(
                "ground truth holds background (0) but this protocol has no background class; "
                "score it with background_class=True or read 0 as ignore"
            )
        scored = target != ignore
        # only the cells the image fills: a dense bincount costs (C + 1)^2 per image, 1.4 M
        # for LVIS's 1,203 classes; numpy's unique, since torch's is far slower on the CPU
        cells = (target[scored] * (top + 1) + prediction[scored]).numpy()
        filled, counts = np.unique(cells, return_counts=True)
        device = self.confusion.device
        self.confusion.view(-1).index_add_(
            0, torch.as_tensor(filled, device=device), torch.as_tensor(counts, device=device)
        )

    def compute(self) -> dict[str, float]:
        confusion = self.confusion.double()
        hits = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - hits
        scored = [self.background_class, *[True] * len(self.classes)]
        per_class = {
            name: float(100 * hit / size) if keep and size > 0 else math.nan
            for name, hit, size, keep in zip((BACKGROUND, *self.classes), hits, union, scored)
        }
        present = [v for v in per_class.values() if not math.isnan(v)]
        miou = sum(present) / len(present) if present else math.nan
        return {"mIoU": miou, **self._per_class(per_class)}


def _rle_bytes(masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The pycocotools RLE strings of (N, H, W) bool masks, back to back, and their lengths."""
    if not len(masks):
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    strings = [rle["counts"] for rle in rles]
    stream = np.frombuffer(b"".join(strings), dtype=np.uint8).copy()
    return torch.from_numpy(stream), torch.tensor([len(s) for s in strings], dtype=torch.long)


def _rles(stream: torch.Tensor, lengths: torch.Tensor, size: list[int]) -> list[dict]:
    data = bytes(stream.cpu().numpy())
    ends = np.cumsum(lengths.cpu().numpy())
    return [
        {"size": size, "counts": data[end - length : end]}
        for end, length in zip(ends.tolist(), lengths.tolist())
    ]


def _coco_index(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates its indexing
        coco.createIndex()
    return coco


class MaskAP(EvaluationMetric):
    """COCO mask AP over per-image predicted instances and ground truth."""

    scalars: ClassVar[dict[str, str]] = {"mAP50": "{:.4f}", "mAP50-95": "{:.4f}"}
    per_class_column = "ap50"

    def __init__(self, classes: Sequence[str], **options: Any) -> None:
        super().__init__(classes, **options)
        # per image: height, width, ground-truth instances, detections
        self.add_state("images", [], "cat")
        self.add_state("truths", [], "cat")  # per instance: label, iscrowd, RLE length
        self.add_state("truth_rles", [], "cat")  # RLE strings, back to back
        self.add_state("detections", [], "cat")  # per detection: label, RLE length
        self.add_state("detection_scores", [], "cat")
        self.add_state("detection_rles", [], "cat")

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
        truths = np.array([i.mask for i in truth.instances], dtype=bool).reshape(-1, *shape)
        truth_stream, truth_lengths = _rle_bytes(truths)
        detection_stream, detection_lengths = _rle_bytes(masks)
        self.images.append(torch.tensor([[*shape, len(truths), len(masks)]], dtype=torch.long))
        truth_rows = [[i.label, int(i.iscrowd)] for i in truth.instances]
        truth_rows = torch.tensor(truth_rows, dtype=torch.long).reshape(-1, 2)
        self.truths.append(torch.cat([truth_rows, truth_lengths[:, None]], 1))
        self.truth_rles.append(truth_stream)
        self.detections.append(torch.stack([torch.from_numpy(labels), detection_lengths], 1))
        self.detection_scores.append(torch.from_numpy(scores))
        self.detection_rles.append(detection_stream)

    def _coco(self) -> tuple[COCO, COCO]:
        """COCO indexes of the ground truth and the detections, from the (reduced) states."""
        images = dim_zero_cat(self.images)
        sizes = images[:, :2].tolist()
        truth_counts, detection_counts = images[:, 2].tolist(), images[:, 3].tolist()
        truths = _per_image(self.truths, self.truth_rles, truth_counts)
        detections = _per_image(self.detections, self.detection_rles, detection_counts)
        scores = torch.split(dim_zero_cat(self.detection_scores), detection_counts)
        coco_images: list[dict] = []
        records: tuple[list[dict], list[dict]] = ([], [])
        for image_id, size, (truth_rows, truth_rles), (
            detection_rows,
            detection_rles,
        ), image_scores in zip(range(1, len(sizes) + 1), sizes, truths, detections, scores):
            coco_images.append({"id": image_id, "height": size[0], "width": size[1]})
            for (label, crowd, _), rle in zip(
                truth_rows.tolist(), _rles(truth_rles, truth_rows[:, -1], size)
            ):
                _add(records[0], image_id, label, rle, iscrowd=crowd)
            for (label, _), score, rle in zip(
                detection_rows.tolist(),
                image_scores.tolist(),
                _rles(detection_rles, detection_rows[:, -1], size),
            ):
                _add(records[1], image_id, label, rle, score=score)
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.classes)]
        return tuple(
            _coco_index({"images": coco_images, "annotations": a, "categories": categories})
            for a in records
        )

    def compute(self) -> dict[str, float]:
        undefined = dict.fromkeys(self.scalars, math.nan)
        undefined |= self._per_class(dict.fromkeys(self.classes, math.nan))
        if len(self.images) == 0 or not (dim_zero_cat(self.truths)[:, 1] == 0).any():
            return undefined  # no image with a ground-truth instance: AP has no meaning
        evaluator = COCOeval(*self._coco(), iouType="segm")  # its IoU thresholds, .5 first
        evaluator.params.areaRng, evaluator.params.areaRngLbl = [[0, 1e10]], ["all"]
        evaluator.params.maxDets = [COCO_MAX_DETECTIONS]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        # (IoU thresholds, recall points, classes); -1 where a class has no ground truth
        precision = evaluator.eval["precision"][:, :, :, 0, 0]
        at_half = precision[0]
        per_class = {
            name: float(column.mean()) if (column > -1).all() else math.nan
            for name, column in zip(self.classes, at_half.T)
        }
        return {
            "mAP50": float(at_half[at_half > -1].mean()),
            "mAP50-95": float(precision[precision > -1].mean()),
            **self._per_class(per_class),
        }


def _per_image(
    rows: Any, stream: Any, counts: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows split by image, each with its RLE bytes (the rows' last column is their length)."""
    row_blocks = torch.split(dim_zero_cat(rows), counts)
    byte_blocks = torch.split(dim_zero_cat(stream), [int(b[:, -1].sum()) for b in row_blocks])
    return list(zip(row_blocks, byte_blocks))


def _add(annotations: list[dict], image_id: int, label: int, rle: dict, **fields: Any) -> None:
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


METRICS: tuple[type[EvaluationMetric], ...] = (SemanticIoU, MaskAP)
SCALARS: dict[str, str] = {name: form for m in METRICS for name, form in m.scalars.items()}
PER_CLASS_COLUMNS: tuple[str, ...] = tuple(
    m.per_class_column for m in METRICS if m.per_class_column
)


def metric_collection(
    classes: Sequence[str], *, background_class: bool = True, **options: Any
) -> MetricCollection:
    """Every metric of :data:`METRICS` for this class list and protocol; ``options`` go to
    each ``Metric`` (e.g. ``sync_on_compute=False`` where one process sees every image)."""
    return MetricCollection(
        {m.__name__: m(classes, background_class=background_class, **options) for m in METRICS},
        compute_groups=False,
    )


def format_scalars(scores: dict[str, float]) -> str:
    """The headline values as one line, e.g. ``mIoU 45.20  mAP50 0.3100``."""
    return "  ".join(f"{name} {form.format(scores[name])}" for name, form in SCALARS.items())
