"""What evaluation compares predictions with: ground-truth masks in a run's class indices.

Conventions (those of VOC): a semantic map is ``uint8`` with 0 = background,
``i + 1`` = class ``i`` and 255 = ignore (void borders, unlabelled pixels, COCO
crowds); ADE20K has no background class (its 0 is unlabelled, so ignore, and
``GroundTruth.background_class`` is False). Where a dataset has no instance masks
(VOC without ``SegmentationObject/``, ADE20K scene parsing), instances are the
8-connected components of each class and ``GroundTruth.instances_derived`` says so:
mAP50 on those is a proxy, not the benchmark's instance metric. Touching objects of
one class merge, and thin parts cut by void fall apart (a VOC bicycle can give a
hundred pieces, past COCO's cap of 100 detections per image and class), so even a
perfect prediction can score below 1 there. The readers are in
:mod:`usam.data.eval_datasets`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

from usam.core.errors import UsageError
from usam.core.labels import IGNORE, MAX_CLASSES


class Instance(NamedTuple):
    mask: np.ndarray  # (H, W) bool
    label: int  # 0-based class index
    iscrowd: bool = False  # COCO crowd region: matching it neither helps nor hurts


@dataclass
class GroundTruth:
    semantic: np.ndarray  # (H, W) uint8: 0 background, i + 1 class i, 255 ignore
    instances: list[Instance]
    instances_derived: bool = False  # True when instances are connected components
    # False where the dataset labels no background (ADE20K: its 0 is unlabelled, read as
    # ignore); mIoU then averages the named classes only (see usam.evaluation.metrics)
    background_class: bool = True


class DatasetError(UsageError, ValueError):
    """A dataset whose layout or annotations this reader cannot use."""


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected regions of a binary mask, ordered by their first pixel in raster order,
    so that instance order does not depend on which labelling algorithm OpenCV picks."""
    _, labels = cv2.connectedComponents(
        np.asarray(mask, dtype=np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    numbers, first_pixels = np.unique(labels, return_index=True)
    raster_order = numbers[np.argsort(first_pixels)]
    return [labels == number for number in raster_order if number != 0]


def instances_from_semantic(semantic: np.ndarray) -> list[Instance]:
    """One instance per connected component of each class (ignore and background skipped)."""
    instances = []
    for value in np.unique(semantic):
        if 0 < value < IGNORE:
            for component in connected_components(semantic == value):
                instances.append(Instance(component, int(value) - 1))
    return instances


def to_superclasses(truth: GroundTruth, label_map: Mapping[int, int]) -> GroundTruth:
    """Ground truth in a coarser vocabulary (``Vocabulary.parent_label_map()``).

    Classes the map leaves out become ignore in the semantic map and lose their
    instances: the coarser vocabulary says nothing about them.
    """
    lookup = np.full(256, IGNORE, dtype=np.uint8)
    lookup[0] = 0
    for fine, coarse in label_map.items():
        lookup[fine + 1] = coarse + 1
    instances = [
        Instance(i.mask, label_map[i.label], i.iscrowd)
        for i in truth.instances
        if i.label in label_map
    ]
    return GroundTruth(
        lookup[truth.semantic], instances, truth.instances_derived, truth.background_class
    )


def read_index_png(path: Path) -> np.ndarray:
    """Class or instance indices of a palette ('P') or grayscale ('L') PNG."""
    if not path.is_file():
        raise DatasetError(f"annotation {path} is missing")
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise DatasetError(
                f"{path} is a '{image.mode}' image; index masks must be palette ('P') or "
                "grayscale ('L') PNGs holding class numbers, not colour renderings"
            )
        return np.array(image, dtype=np.uint8)


def check_values(semantic: np.ndarray, num_classes: int, path: Path | str) -> np.ndarray:
    values = np.unique(semantic)
    bad = values[(values > num_classes) & (values != IGNORE)]
    if bad.size:
        raise DatasetError(
            f"{path} holds values {bad.tolist()}, outside 0..{num_classes} and {IGNORE}; "
            "the mask does not belong to this dataset's class list"
        )
    return semantic


def check_size(image: Image.Image, size: tuple[int, int], image_path: Path, other: str) -> None:
    if image.size != size:
        raise DatasetError(
            f"{image_path} is {image.size[0]}x{image.size[1]} but {other} is "
            f"{size[0]}x{size[1]}; the annotation does not belong to this image"
        )


def png_size(path: Path) -> tuple[int, int]:
    if not path.is_file():
        raise DatasetError(f"annotation {path} is missing")
    with Image.open(path) as image:
        return image.size


def check_class_count(classes: Sequence[str], where: str | Path) -> tuple[str, ...]:
    if len(classes) > MAX_CLASSES:
        raise DatasetError(
            f"{where}: {len(classes)} classes; semantic maps hold at most {MAX_CLASSES} "
            "(uint8 with 255 = ignore)"
        )
    return tuple(classes)


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path} does not exist; {what}")
    return path


# ---------------------------------------------------------------- PASCAL VOC 2012
