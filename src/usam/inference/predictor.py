"""Turn a trained head and an image's SAM masks into labelled instances.

One ``Predictor`` serves the evaluation callback, ``usam.eval`` and annotation:
per-mask softmax over C+1 outputs, keep masks whose best non-background
probability passes a threshold, greedy NMS on mask IoU (class-agnostic or per
class), and a cap on detections per image. The two steps are separate so a
threshold sweep can score every mask once and re-select many times.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from usam.core.devices import resolve_device
from usam.core.errors import UsageError
from usam.core.provenance import Provenance
from usam.core.weights import load_weights
from usam.formats.embedding_shards import ImageRecord, decode_masks, encode_mask
from usam.inference.semantic_map import semantic_from_instances
from usam.train.head import MaskClassifierHead, input_dim, select_input_view
from usam.train.head_metadata import HeadMetadata
from usam.train.losses import normalised_entropy


class HeadCheckpointError(UsageError, ValueError):
    """A file that is not a usam head checkpoint."""


@dataclass(frozen=True)
class InferenceSettings:
    confidence_threshold: float = 0.7  # the paper's threshold (conf/inference/default.yaml)
    nms_iou: float = 0.5
    nms_per_class: bool = False
    max_detections: int = 100  # what COCO mask mAP counts per image

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold={self.confidence_threshold} must be in [0, 1]")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou={self.nms_iou} must be in (0, 1]")
        if self.max_detections < 1:
            raise ValueError(f"max_detections={self.max_detections} must be at least 1")


@dataclass
class HeadCheckpoint:
    """A head with what it was trained on, read from a teacher or student checkpoint.

    ``classes``, ``sam_model_type`` and ``provenance`` are what evaluation reads of any
    predictor's checkpoint (the baselines' stand-ins have the same three)."""

    head: MaskClassifierHead
    metadata: HeadMetadata
    path: Path | None = None  # None for a head still in training

    @property
    def classes(self) -> list[str]:
        return list(self.metadata.classes)

    @property
    def sam_model_type(self) -> str | None:
        return self.metadata.sam_model_type

    @property
    def provenance(self) -> Provenance:
        return self.metadata.provenance.about("the head's training data")

    def check_sam(self, sam: str, error: type[Exception]) -> None:
        self.metadata.check_sam(sam, str(self.path or "the head"), error)

    def check_precision(self, precision: str) -> None:
        self.metadata.check_precision(precision, str(self.path or "the head"))


def load_head(path: str | Path, config_key: str = "ckpt") -> HeadCheckpoint:
    """Load only the head (never the teacher inside a student), weights only."""
    checkpoint = load_weights(path, config_key, HeadCheckpointError)
    path = Path(path)
    if (
        not isinstance(checkpoint, dict)
        or "usam" not in checkpoint
        or "hyper_parameters" not in checkpoint
    ):
        raise HeadCheckpointError(
            f"{path} is not a usam head checkpoint (no 'usam' metadata): pass a checkpoint "
            "written by `python -m usam.fit` (checkpoints/teacher or checkpoints/student)"
        )
    meta = HeadMetadata.from_checkpoint(checkpoint["usam"], str(path), HeadCheckpointError)
    hparams = checkpoint["hyper_parameters"]
    head = MaskClassifierHead(
        input_dim(meta.input_view, hparams["embed_dim"]),
        len(meta.classes) + 1,
        **dict(hparams.get("head") or {}),
    )
    state = {
        key.removeprefix("head."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("head.")
    }
    head.load_state_dict(state)
    head.eval()
    return HeadCheckpoint(head, meta, path)


@dataclass
class Prediction:
    """Kept instances of one image: what evaluation scores and every export writes.

    ``labels`` are 0-based class indices. ``entropies`` hold the head's normalised entropy
    over background and the classes for each instance (0 sure, 1 no idea), from which
    exports order images for review.
    """

    key: str
    height: int
    width: int
    rles: list[dict[str, Any]]  # pycocotools RLE, ``counts`` a str
    labels: np.ndarray
    scores: np.ndarray
    entropies: np.ndarray
    mask_indices: np.ndarray  # which of the image's SAM masks each instance is

    def masks(self) -> np.ndarray:
        """(K, H, W) bool."""
        return decode_masks(self.rles, self.height, self.width)

    def boxes(self) -> np.ndarray:
        """(K, 4) XYWH, tight around each mask."""
        if not self.rles:
            return np.zeros((0, 4))
        return mask_utils.toBbox(self.rles).reshape(-1, 4)

    def areas(self) -> np.ndarray:
        return mask_utils.area(self.rles) if self.rles else np.zeros(0, dtype=np.int64)

    def semantic_map(self) -> np.ndarray:
        """(H, W) uint8: 0 background, ``label + 1`` where the best-scoring instance lies."""
        shape = (self.height, self.width)
        return semantic_from_instances(self.masks(), self.labels, self.scores, shape)

    def uncertainty(self) -> float:
        """How much the image needs a person: the mean entropy of its instances, and 1 when
        the head kept nothing, since then a person must find every object."""
        return float(np.mean(self.entropies)) if len(self.entropies) else 1.0

    def with_pixels(self) -> Prediction:
        """The instances that have pixels: an empty mask is nothing a person can review."""
        keep = self.areas() > 0
        return dataclasses.replace(
            self,
            rles=[rle for rle, kept in zip(self.rles, keep) if kept],
            labels=self.labels[keep],
            scores=self.scores[keep],
            entropies=self.entropies[keep],
            mask_indices=self.mask_indices[keep],
        )

    def resized(self, height: int, width: int) -> Prediction:
        """The same instances on a (height, width) grid: masks of an image SAM saw scaled
        down, written back at the file's size (nearest neighbour, as label maps are)."""
        size = (width, height)
        masks = [
            np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
            for mask in self.masks().astype(np.uint8)
        ]
        rles = [encode_mask(mask) for mask in masks]
        return dataclasses.replace(self, height=height, width=width, rles=rles)


def mask_ious(rles: list[dict[str, Any]]) -> np.ndarray:
    """Pairwise mask IoU, computed on RLE (no decoding)."""
    if not rles:
        return np.zeros((0, 0))
    return np.asarray(mask_utils.iou(rles, rles, [0] * len(rles)), dtype=np.float64)


def select_instances(
    record: ImageRecord,
    probs: np.ndarray,
    settings: InferenceSettings,
    ious: np.ndarray | None = None,
) -> Prediction:
    """Threshold, NMS and cap on precomputed (N, C+1) probabilities.

    ``ious`` (all-mask IoU matrix) may be passed in so sweeps compute it once.
    Ties in score keep the earlier mask.
    """
    labels = probs[:, 1:].argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    scores = probs[np.arange(len(probs)), labels + 1] if len(probs) else np.zeros(0)
    candidates = np.flatnonzero(scores >= settings.confidence_threshold)
    candidates = candidates[np.argsort(-scores[candidates], kind="stable")]
    rles = record.coco_rles()
    if ious is None:
        ious = mask_ious([rles[i] for i in candidates])
        local = np.arange(len(candidates))
    else:
        local = candidates
    kept: list[int] = []
    for position, index in enumerate(candidates):
        if len(kept) == settings.max_detections:
            break
        overlaps = [
            k
            for k in kept
            if ious[local[position], local[k]] > settings.nms_iou
            and (not settings.nms_per_class or labels[index] == labels[candidates[k]])
        ]
        if not overlaps:
            kept.append(position)
    chosen = candidates[kept]
    entropies = np.zeros(0, np.float32)
    if len(chosen):
        entropies = normalised_entropy(torch.from_numpy(probs[chosen])).numpy().astype(np.float32)
    return Prediction(
        key=record.key,
        height=record.height,
        width=record.width,
        rles=[rles[i] for i in chosen],
        labels=labels[chosen].astype(np.int64),
        scores=scores[chosen].astype(np.float32),
        entropies=entropies,
        mask_indices=chosen.astype(np.int64),
    )


class Predictor:
    """A trained head plus inference settings."""

    def __init__(
        self,
        checkpoint: HeadCheckpoint,
        settings: InferenceSettings | None = None,
        device: str | torch.device = "auto",
    ) -> None:
        """``device``: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``,
        ``cuda:N`` or a ``torch.device``; a GPU that is not there is refused by name."""
        self.checkpoint = checkpoint
        self.settings = settings or InferenceSettings()
        self.device = resolve_device(str(device), "device")
        self.head = checkpoint.head.to(self.device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        settings: InferenceSettings | None = None,
        device: str | torch.device = "auto",
    ) -> Predictor:
        return cls(load_head(path), settings, device)

    @property
    def classes(self) -> list[str]:
        return self.checkpoint.classes

    @torch.no_grad()
    def mask_probabilities(self, record: ImageRecord) -> np.ndarray:
        """(N, C+1) softmax over background and the classes for every SAM mask."""
        embeddings = torch.from_numpy(record.embeddings).to(self.device)
        multimask = torch.from_numpy(record.multimask.astype(np.int64)).to(self.device)
        features = select_input_view(embeddings, multimask, self.checkpoint.metadata.input_view)
        return self.head(features).softmax(-1).cpu().numpy()

    def __call__(self, record: ImageRecord) -> Prediction:
        return select_instances(record, self.mask_probabilities(record), self.settings)
