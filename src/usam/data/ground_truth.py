"""What evaluation compares predictions with: ground-truth masks in a run's class indices.

Conventions (those of VOC): a semantic map is ``uint8`` with 0 = background,
``i + 1`` = class ``i`` and 255 = ignore (void borders, unlabelled pixels, COCO
crowds), ``uint16`` with 65535 = ignore for more than 254 classes
(:mod:`usam.core.labels`); ADE20K has no background class (its 0 is unlabelled, so ignore, and
``GroundTruth.background_class`` is False). Where a dataset has no instance masks
(VOC without ``SegmentationObject/``, ADE20K scene parsing), instances are the
8-connected components of each class and ``GroundTruth.instances_derived`` says so:
mAP50 on those is a proxy, not the benchmark's instance metric. Touching objects of
one class merge, and thin parts cut by void fall apart (a VOC bicycle can give a
hundred pieces, past COCO's cap of 100 detections per image and class), so even a
perfect prediction can score below 1 there. The readers are in
:mod:`usam.data.eval_datasets`; what they share (index PNGs, instances painted into a
semantic map, YOLO-seg polygons, the checks) is here.
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
from usam.core.labels import MAX_CLASSES, ignore_from_disk, ignore_value, label_dtype


class Instance(NamedTuple):
    mask: np.ndarray  # (H, W) bool
    label: int  # 0-based class index
    iscrowd: bool = False  # COCO crowd region: matching it neither helps nor hurts


@dataclass
class GroundTruth:
    semantic: np.ndarray  # (H, W) uint8 / uint16: 0 background, i + 1 class i, top = ignore
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
    ignore = ignore_value(semantic.dtype)
    for value in np.unique(semantic):
        if 0 < value < ignore:
            for component in connected_components(semantic == value):
                instances.append(Instance(component, int(value) - 1))
    return instances


def paint_instances(
    instances: Sequence[Instance], shape: tuple[int, int], num_classes: int
) -> np.ndarray:
    """Semantic map of annotated instances: larger ones first so smaller ones stay visible;
    crowd regions are ignore where no single instance covers them."""
    semantic = np.zeros(shape, dtype=label_dtype(num_classes))
    crowd = np.zeros(shape, dtype=bool)
    for instance in sorted(instances, key=lambda i: -int(i.mask.sum())):
        if instance.iscrowd:
            crowd |= instance.mask
        else:
            semantic[instance.mask] = instance.label + 1
    semantic[crowd & (semantic == 0)] = ignore_value(semantic.dtype)
    return semantic


def parse_yolo_polygons(path: Path, num_classes: int) -> list[tuple[int, np.ndarray]]:
    """(class index, normalised (x, y) points) per line of a YOLO-seg label file."""
    polygons = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        try:
            label, coords = int(fields[0]), np.array(fields[1:], dtype=np.float64)
        except ValueError as error:
            raise DatasetError(f"{where}: not 'class x1 y1 x2 y2 ...' numbers ({error})") from error
        if not 0 <= label < num_classes:
            raise DatasetError(f"{where}: class {label} is outside 0..{num_classes - 1}")
        if coords.size == 4:
            raise DatasetError(
                f"{where}: 'class cx cy w h' is a box label; this reader needs YOLO-seg polygons"
            )
        if coords.size % 2 or coords.size < 6:
            raise DatasetError(f"{where}: a polygon needs an even count of at least 6 coordinates")
        polygons.append((label, np.clip(coords, 0.0, 1.0).reshape(-1, 2)))
    return polygons


def to_superclasses(truth: GroundTruth, label_map: Mapping[int, int]) -> GroundTruth:
    """Ground truth in a coarser vocabulary (``Vocabulary.parent_label_map()``).

    Classes the map leaves out become ignore in the semantic map and lose their
    instances: the coarser vocabulary says nothing about them.
    """
    ignore = ignore_value(truth.semantic.dtype)
    lookup = np.full(ignore + 1, ignore, dtype=truth.semantic.dtype)
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
    """Class or instance indices of a palette ('P'), grayscale ('L') or 16-bit grayscale
    ('I;16', for more than 254 classes) PNG, as uint8 or uint16 by the file's depth."""
    if not path.is_file():
        raise DatasetError(f"annotation {path} is missing")
    with Image.open(path) as image:
        if image.mode in ("P", "L"):
            return np.array(image, dtype=np.uint8)
        if image.mode in ("I;16", "I"):
            values = np.array(image)
            if values.size and (values.min() < 0 or values.max() > np.iinfo(np.uint16).max):
                raise DatasetError(f"{path} holds values outside 16 bits")
            return values.astype(np.uint16)
        raise DatasetError(
            f"{path} is a '{image.mode}' image; index masks must be palette ('P') or "
            "grayscale ('L', 'I;16') PNGs holding class numbers, not colour renderings"
        )


def check_values(semantic: np.ndarray, num_classes: int, path: Path | str) -> np.ndarray:
    """The map read from ``path`` in the layout of ``num_classes`` (uint16 beyond 254), after
    checking that it holds only its classes and its file's ignore value."""
    values = np.unique(semantic)
    ignore = ignore_value(semantic.dtype)
    bad = values[(values > num_classes) & (values != ignore)]
    if bad.size:
        raise DatasetError(
            f"{path} holds values {bad.tolist()}, outside 0..{num_classes} and {ignore}; "
            "the mask does not belong to this dataset's class list"
        )
    return ignore_from_disk(semantic, num_classes)


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
            "(uint16 with 65535 = ignore)"
        )
    return tuple(classes)


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path} does not exist; {what}")
    return path


# ---------------------------------------------------------------- PASCAL VOC 2012
