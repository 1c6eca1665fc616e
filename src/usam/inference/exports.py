"""The files a labelled folder is exported as: per-image results, COCO, PNG maps, YOLO-seg.

Every export is written from the same per-image results (``results/<key>.json``,
a :class:`~usam.inference.predictor.Prediction` and its file name), so the Python API,
``usam.annotate`` and every format agree on each instance.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from usam.core.errors import UsageError
from usam.core.labels import BACKGROUND, label_dtype
from usam.formats.storage import atomic_write_text, writers_tmp
from usam.inference.polygons import polygon_of
from usam.inference.predictor import Prediction
from usam.viz.overlays import PALETTE, blend, legend_strip

LEGEND_WIDTH = 640
EXPORTS = ("coco", "yolo", "label_studio", "cvat")
# the package each review export encodes with: the `review` extra installs them
REQUIRES = {"label_studio": "label_studio_sdk", "cvat": "cvat_sdk"}


class ExportError(UsageError):
    """An export that cannot be written as asked: an unknown name, images out of reach."""


def check_exports(names: str | Sequence[str]) -> tuple[str, ...]:
    """``export=`` as a tuple of known names (one name or a list) whose packages are there."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if name not in EXPORTS:
            raise ExportError(
                f"export={name} is not an export; choose from {', '.join(EXPORTS)} "
                "(one name or a list: export=[coco,label_studio])"
            )
        if name in REQUIRES and importlib.util.find_spec(REQUIRES[name]) is None:
            raise ExportError(
                f"export={name} needs the {REQUIRES[name]} package: pip install 'usam[review]'"
            )
    return names


@dataclass(frozen=True)
class LabelledImage:
    """An image's path relative to the folder annotated, and its kept instances."""

    file_name: str
    prediction: Prediction


def class_colour(label: int) -> str:
    """The ``#rrggbb`` colour of class ``label`` in the semantic PNGs, for annotation tools."""
    return "#{:02x}{:02x}{:02x}".format(*PALETTE[label + 1])


def write_result(image: LabelledImage, classes: Sequence[str], path: Path) -> None:
    """The per-image result every export is rebuilt from."""
    prediction = image.prediction
    instances = [
        {
            "label": int(label),
            "name": classes[label],
            "score": float(score),
            "entropy": float(entropy),
            "mask_index": int(index),
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"]},
            "bbox": [float(v) for v in box],
            "area": int(area),
        }
        for label, score, entropy, index, rle, box, area in zip(
            prediction.labels,
            prediction.scores,
            prediction.entropies,
            prediction.mask_indices,
            prediction.rles,
            prediction.boxes(),
            prediction.areas(),
        )
    ]
    result = {
        "key": prediction.key,
        "file_name": image.file_name,
        "height": prediction.height,
        "width": prediction.width,
        "uncertainty": prediction.uncertainty(),
        "instances": instances,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result))


def read_result(path: Path) -> LabelledImage:
    result = json.loads(path.read_text())
    instances = result["instances"]

    def column(name: str, dtype: type) -> np.ndarray:
        return np.array([instance[name] for instance in instances], dtype=dtype)

    prediction = Prediction(
        key=result["key"],
        height=result["height"],
        width=result["width"],
        rles=[instance["segmentation"] for instance in instances],
        labels=column("label", np.int64),
        scores=column("score", np.float32),
        entropies=column("entropy", np.float32),
        mask_indices=column("mask_index", np.int64),
    )
    return LabelledImage(result["file_name"], prediction)


def coco_instances(images: Sequence[LabelledImage], classes: Sequence[str]) -> dict[str, Any]:
    """A COCO instances document: image ids follow ``images``, category ``i + 1`` is class i;
    each image carries its ``uncertainty`` (the review order's key)."""
    entries, annotations = [], []
    for image_id, image in enumerate(images, start=1):
        prediction = image.prediction
        entries.append(
            {
                "id": image_id,
                "file_name": image.file_name,
                "height": prediction.height,
                "width": prediction.width,
                "uncertainty": prediction.uncertainty(),
            }
        )
        for label, score, rle, box, area in zip(
            prediction.labels,
            prediction.scores,
            prediction.rles,
            prediction.boxes(),
            prediction.areas(),
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"]},
                    "area": int(area),
                    "bbox": [float(v) for v in box],
                    "iscrowd": 0,
                    "score": float(score),
                }
            )
    return {
        "info": {"description": "instances annotated by usam (U-SAM) from class names"},
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
    }


def _save_atomic(image: Image.Image, path: Path, **options: Any) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = writers_tmp(path)
    image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"), **options)
    os.replace(tmp, path)


def save_semantic(semantic: np.ndarray, path: Path, num_classes: int) -> None:
    """A PNG whose pixel values are the labels: a palette PNG in VOC's colours up to 254
    classes, a 16-bit grayscale one ("I;16") for larger vocabularies, whose labels a
    palette cannot hold; the format follows the vocabulary, so one run's files share it."""
    if label_dtype(num_classes) == np.uint8:
        png = Image.fromarray(np.asarray(semantic, dtype=np.uint8), mode="P")
        png.putpalette(PALETTE.flatten().tolist())
    else:
        png = Image.fromarray(np.asarray(semantic, dtype=np.uint16))  # mode "I;16"
    _save_atomic(png, path)


def save_overlay(image: np.ndarray, semantic: np.ndarray, classes: Sequence[str], path: Path):
    """The labels blended over the photo, with a legend of the classes it shows."""
    names = [BACKGROUND, *classes]
    shown = sorted(set(np.unique(semantic).tolist()) - {0})
    height, width = semantic.shape
    legend = legend_strip([0, *shown], names, width)
    sheet = Image.new("RGB", (width, height + legend.height), "white")
    sheet.paste(Image.fromarray(blend(image, semantic)), (0, 0))
    sheet.paste(legend, (0, height))
    _save_atomic(sheet, path, quality=90)


def save_legend(classes: Sequence[str], path: Path) -> None:
    """Every class's colour, as in the semantic PNGs."""
    names = [BACKGROUND, *classes]
    _save_atomic(legend_strip(range(len(names)), names, LEGEND_WIDTH), path)


def save_yolo(prediction: Prediction, path: Path) -> None:
    """``class x1 y1 x2 y2 ...`` per instance, coordinates as fractions of the image size."""
    lines = []
    scale = np.array([prediction.width, prediction.height], dtype=np.float64)
    for label, mask in zip(prediction.labels, prediction.masks()):
        coords = " ".join(f"{v:.6f}" for v in (polygon_of(mask) / scale).flatten())
        lines.append(f"{int(label)} {coords}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
