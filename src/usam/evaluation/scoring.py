"""Score a head on an evaluation shard set: the metric collection, per-class table, threshold sweep.

One pass over the images: each image's masks go through the head once, and
those probabilities (with the image's all-mask IoU matrix, decoded masks and
ground truth) are reused for the configured inference settings and for every
point of a (confidence threshold x NMS IoU) sweep, so ablations over thresholds
never re-run the head. The semantic map of a prediction follows
:func:`usam.inference.semantic_map.semantic_from_instances` (highest-scoring kept mask wins
a pixel, background elsewhere); on a dataset without a background class (ADE20K) mIoU
follows its 150-class protocol, where such an uncovered pixel is a miss for its true class.

The sweep scores thresholds on the evaluation set itself, so it is after-the-fact
analysis on test data, not model selection: every output of it says so
(:data:`SWEEP_ON_TEST`); thresholds picked from it would be tuned on the data that
scores them.

Under DDP each rank scores its share (:func:`usam.data.eval_shards.rank_records`, the loaders'
rule) and the metrics and counts reduce their states over the ranks when computed, so every
rank ends with the one-process scores; the overlays are of rank zero's images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.aggregation import MaxMetric, SumMetric

from usam.core.errors import UsageError
from usam.core.labels import BACKGROUND
from usam.core.progress import progress_bar
from usam.core.provenance import Provenance
from usam.core.vocabulary import PACKAGED, Vocabulary, load_vocabulary
from usam.data.eval_datasets import load_ground_truth
from usam.data.eval_shards import rank_records
from usam.data.ground_truth import GroundTruth
from usam.data.rank_shares import RankShare
from usam.data.sources import ImageSource
from usam.evaluation.metrics import PER_CLASS_COLUMNS, SCALARS, metric_collection
from usam.formats import storage
from usam.formats.embedding_shards import (
    ImageRecord,
    Manifest,
    check_manifest,
    iter_records,
    read_manifest,
)
from usam.inference.predictor import (
    HeadCheckpoint,
    InferenceSettings,
    Predictor,
    mask_ious,
    select_instances,
)
from usam.inference.semantic_map import semantic_from_instances

SWEEP_ON_TEST = "after-the-fact analysis on test data, not model selection"
SWEEP_COLUMNS = ("confidence_threshold", "nms_iou", *SCALARS)
ONE_PROCESS = RankShare()
COUNTS = {"images": SumMetric, "masks": SumMetric, "detections": SumMetric}


class EvaluationError(UsageError, ValueError):
    """An evaluation set or head that cannot be scored together."""


@dataclass(frozen=True)
class ThresholdGrid:
    """Confidence thresholds x NMS IoU thresholds; the other settings stay as configured."""

    confidence_thresholds: tuple[float, ...]
    nms_ious: tuple[float, ...]

    def settings(self, base: InferenceSettings) -> list[InferenceSettings]:
        return [
            replace(base, confidence_threshold=c, nms_iou=n)
            for c in self.confidence_thresholds
            for n in self.nms_ious
        ]


@dataclass
class SweepPoint:
    confidence_threshold: float
    nms_iou: float
    scores: dict[str, float]  # the headline scalars (metrics.SCALARS) at these settings

    def row(self) -> list[float]:
        """The values of :data:`SWEEP_COLUMNS`."""
        return [self.confidence_threshold, self.nms_iou, *self.scores.values()]


@dataclass
class ClassScore:
    """One row of the per-class table: each metric's per-class column (``iou``, ``ap50``);
    NaN where that metric does not score the class (no pixel or instance of it, or
    background where a metric or dataset has none)."""

    name: str
    values: dict[str, float]


@dataclass
class Sample:
    """What an overlay shows for one image (``image`` is grey without a source to read it)."""

    key: str
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray


@dataclass
class Evaluation:
    scores: dict[str, float]  # every named scalar of the metric collection
    names: list[str]  # background (label 0), then the classes, as the class maps index them
    images: int
    masks: int
    detections: int
    instances_derived: bool  # some ground-truth instances are connected components
    provenance: Provenance  # why the numbers are not results (no reason when they are)
    settings: InferenceSettings
    sweep: list[SweepPoint] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the images this process scored (its share)

    @property
    def headline(self) -> dict[str, float]:
        """The metrics' headline scalars (:data:`usam.evaluation.metrics.SCALARS`), in order."""
        return {name: self.scores[name] for name in SCALARS}

    def scalars(self) -> dict[str, float]:
        """What a logger records: every headline scalar, and each per-class one that is defined."""
        defined = {k: v for k, v in self.scores.items() if math.isfinite(v)}
        return self.headline | defined

    @property
    def per_class(self) -> list[ClassScore]:
        return [
            ClassScore(
                name, {c: self.scores.get(f"{c}/{name}", math.nan) for c in PER_CLASS_COLUMNS}
            )
            for name in self.names
        ]

    def summary(self) -> dict[str, Any]:
        """JSON-able scalars and the per-class table (NaN written as null)."""
        return _finite(
            {
                **self.headline,
                "images": self.images,
                "masks": self.masks,
                "detections": self.detections,
                "instances_derived": self.instances_derived,
                **self.provenance.fields(),
                "inference": asdict(self.settings),
                "per_class": [{"name": s.name, **s.values} for s in self.per_class],
                "threshold_sweep": (
                    {
                        "analysis": SWEEP_ON_TEST,
                        "points": [dict(zip(SWEEP_COLUMNS, p.row())) for p in self.sweep],
                    }
                    if self.sweep
                    else None
                ),
            }
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def resolve_vocabulary(classes: Sequence[str], spec: str | None = None) -> Vocabulary:
    """The head's vocabulary with its parent, if any (a checkpoint stores only class names).

    A packaged vocabulary with the same classes is used so that a superclass head
    knows how to map the fine ground truth; ``spec`` names one explicitly.
    """
    classes = tuple(classes)
    candidates = [spec] if spec else list(PACKAGED)
    for name in candidates:
        vocabulary = load_vocabulary(name)
        if vocabulary.classes == classes:
            return vocabulary
    if spec:
        raise EvaluationError(
            f"vocabulary {spec!r} lists other classes than the checkpoint "
            f"({len(classes)} classes starting {list(classes[:3])}); drop it or pick the "
            "vocabulary the head was trained with"
        )
    return load_vocabulary(list(classes))


def check_eval_set(
    manifest: Manifest, directory: Path, predictor: Predictor, vocabulary: Vocabulary
) -> None:
    """Fail before any work when the shards cannot be scored with this head."""
    if manifest.kind != "eval":
        raise EvaluationError(
            f"{directory} is a '{manifest.kind}' shard set; evaluation needs one made from an "
            "annotated dataset (usam.eval eval_data=... creates it)"
        )
    head = predictor.checkpoint  # the baselines' stand-ins take masks of any precision
    precision = head.metadata.mask_precision if isinstance(head, HeadCheckpoint) else None
    check_manifest(manifest, directory, sam_model_type=head.sam_model_type, precision=precision)
    check_head_classes(vocabulary, manifest.classes, str(directory))


def check_head_classes(vocabulary: Vocabulary, dataset: Sequence[str], where: str) -> None:
    """Fail unless the head predicts the classes ``where`` is annotated with, or a grouping
    of them (a superclass head on its parent's dataset)."""
    dataset = tuple(dataset)
    if vocabulary.classes == dataset:
        return
    if vocabulary.parent and load_vocabulary(vocabulary.parent).classes == dataset:
        return
    raise EvaluationError(
        f"the head predicts {vocabulary.num_classes} classes ({list(vocabulary.classes[:3])}...) "
        f"but {where} is annotated with {len(dataset)} ({list(dataset[:3])}...); evaluate "
        "on a dataset with the head's classes or a grouping of them"
    )


def provenance_of(manifest: Manifest, predictor: Predictor) -> Provenance:
    """Why these metrics are not results: the head's (or baseline's), then the evaluation set's."""
    return predictor.checkpoint.provenance + manifest.provenance.about("evaluation masks")


def _truth_of(record: ImageRecord, vocabulary: Vocabulary, directory: Path) -> GroundTruth:
    if record.ground_truth is None:
        raise EvaluationError(
            f"image {record.key!r} in {directory} has no ground truth (a plain image folder?); "
            "evaluation needs an annotated dataset"
        )
    truth = load_ground_truth(record.ground_truth, vocabulary)
    if truth.semantic.shape != (record.height, record.width):
        raise EvaluationError(
            f"image {record.key!r}: masks are {record.width}x{record.height} but its ground truth "
            f"is {truth.semantic.shape[1]}x{truth.semantic.shape[0]}; re-extract {directory}"
        )
    return truth


class _Scorer:
    """The metric collection for one inference setting."""

    def __init__(
        self,
        classes: Sequence[str],
        settings: InferenceSettings,
        background_class: bool,
        share: RankShare,
    ):
        self.settings = settings
        # gathering only where ranks split the images: a rank scoring alone must not wait
        self.metrics = metric_collection(
            classes, background_class=background_class, sync_on_compute=share.world_size > 1
        )

    def update(
        self,
        record: ImageRecord,
        probs: np.ndarray,
        ious: np.ndarray | None,
        masks: np.ndarray,
        truth: GroundTruth,
    ) -> tuple[np.ndarray, int]:
        """The image's semantic map and how many detections it kept."""
        prediction = select_instances(record, probs, self.settings, ious)
        kept = masks[prediction.mask_indices]
        shape = (record.height, record.width)
        semantic = semantic_from_instances(kept, prediction.labels, prediction.scores, shape)
        self.metrics.update(
            semantic=semantic,
            masks=kept,
            labels=prediction.labels,
            scores=prediction.scores,
            truth=truth,
        )
        return semantic, len(prediction.labels)

    def sweep_point(self) -> SweepPoint:
        scores = self.metrics.compute()
        headline = {name: scores[name] for name in SCALARS}
        return SweepPoint(self.settings.confidence_threshold, self.settings.nms_iou, headline)


def _counts(share: RankShare) -> dict[str, Metric]:
    """The counts, reduced over ranks like the metrics (float64: exact for any mask count)."""
    kinds = COUNTS | {"instances_derived": MaxMetric}
    sync = share.world_size > 1
    return {n: kind(sync_on_compute=sync).set_dtype(torch.float64) for n, kind in kinds.items()}


def share_size(manifest: Manifest, share: RankShare) -> int:
    """How many images of the set rank ``share.rank`` scores (:meth:`RankShare.samples`)."""
    shard_images = [s["images"] for s in manifest.shards]
    if share.by_shard(len(shard_images)):
        return sum(shard_images[share.rank :: share.world_size])
    return len(range(share.rank, sum(shard_images), share.world_size))


def sample_positions(count: int, wanted: int) -> set[int]:
    """Evenly spaced image positions, the same every epoch."""
    if wanted <= 0 or count <= 0:
        return set()
    return {int(p) for p in np.linspace(0, count - 1, min(wanted, count)).round()}


def _image_of(source: ImageSource | None, record: ImageRecord) -> np.ndarray:
    if source is None or record.key not in source.keys:
        return np.full((record.height, record.width, 3), 128, dtype=np.uint8)
    return np.asarray(source.load(source.keys.index(record.key)).image)


def evaluate(
    directory: str | Path,
    predictor: Predictor,
    *,
    vocabulary: Vocabulary | None = None,
    sweep: ThresholdGrid | None = None,
    num_samples: int = 0,
    source: ImageSource | None = None,
    progress: bool = False,
    share: RankShare = ONE_PROCESS,
) -> Evaluation:
    """Score ``predictor`` on the eval shard set in ``directory`` (the ``eval`` split folder).

    ``num_samples`` images, evenly spaced over rank zero's share, are kept for overlays;
    their pixels are read from ``source`` (the image source the set was extracted from)
    when given. ``progress`` shows a bar (not inside a Trainer, which draws its own).
    ``share``: this process's rank under DDP, where every rank calls this together.

    Long because it is the one pass over the images that feeds every scorer.
    """
    directory = storage.location(directory)
    manifest = read_manifest(directory)
    vocabulary = vocabulary or resolve_vocabulary(predictor.classes)
    check_eval_set(manifest, directory, predictor, vocabulary)
    if manifest.num_images < share.world_size:  # alike on every rank, so none waits
        raise EvaluationError(
            f"{directory} holds {manifest.num_images} images for {share.world_size} ranks, "
            "each needing one: re-extract it from the dataset, or score it on fewer ranks"
        )
    records = rank_records(directory, share) if share.world_size > 1 else iter_records(directory)
    first = next(records)  # the check above leaves every rank an image
    # one dataset per shard set, so its first image tells the mIoU protocol
    background = _truth_of(first, vocabulary, directory).background_class
    main, *grid = (
        _Scorer(vocabulary.classes, settings, background, share)
        for settings in [predictor.settings, *(sweep.settings(predictor.settings) if sweep else [])]
    )
    counts = _counts(share)
    on_rank_zero = share_size(manifest, share) if share.rank == 0 else 0
    wanted = sample_positions(on_rank_zero, num_samples)
    samples, keys = [], []
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("scoring", total=share_size(manifest, share))
        for position, record in enumerate(chain([first], records)):
            truth = _truth_of(record, vocabulary, directory)
            probs = predictor.mask_probabilities(record)
            ious = mask_ious(record.coco_rles()) if grid else None
            decoded = record.masks()
            semantic, detections = main.update(record, probs, ious, decoded, truth)
            for scorer in grid:
                scorer.update(record, probs, ious, decoded, truth)
            if position in wanted:
                image = _image_of(source, record)
                samples.append(Sample(record.key, image, truth.semantic, semantic))
            keys.append(record.key)
            derived = truth.instances_derived
            for name, value in zip(counts, (1, record.num_masks, detections, derived)):
                counts[name].update(float(value))
            bar.advance(task)
    totals = {name: int(metric.compute().item()) for name, metric in counts.items()}
    return Evaluation(
        scores=main.metrics.compute(),
        names=[BACKGROUND, *vocabulary.classes],
        **{name: totals[name] for name in COUNTS},
        instances_derived=bool(totals["instances_derived"]),
        provenance=provenance_of(manifest, predictor),
        settings=predictor.settings,
        sweep=[scorer.sweep_point() for scorer in grid],
        samples=samples,
        keys=keys,
    )
