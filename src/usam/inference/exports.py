"""One image's labelled instances and the files they are exported as (COCO, PNG, YOLO-seg).

Kept apart from the command so that the Python API and ``usam.annotate`` write
and read one format: a per-image result (instances with RLE masks) from which
the COCO JSON is rebuilt, and the images drawn from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from usam.core.labels import BACKGROUND
from usam.formats.embedding_shards import decode_masks
from usam.formats.storage import atomic_write_text
from usam.viz.overlays import PALETTE, blend, legend_strip

LEGEND_WIDTH = 640


@dataclass
class Annotation:
    """Kept instances of one image and its semantic map (0 background, ``label + 1``)."""

    key: str
    height: int
    width: int
    rles: list[dict[str, Any]]  # pycocotools RLE, ``counts`` a str
    labels: np.ndarray  # 0-based class indices
    names: list[str]  # class name of each instance
    scores: np.ndarray
    semantic: np.ndarray  # (H, W) uint8

    def masks(self) -> np.ndarray:
        """(K, H, W) bool."""
        return decode_masks(self.rles, self.height, self.width)

    def boxes(self) -> np.ndarray:
        """(K, 4) XYWH, tight around each mask."""
        if not self.rles:
            return np.zeros((0, 4))
        return mask_utils.toBbox(self.rles).reshape(-1, 4)

    def to_result(self, file_name: str) -> dict[str, Any]:
        """The JSON-able per-image result the COCO file is rebuilt from."""
        areas = mask_utils.area(self.rles) if self.rles else []
        return {
            "key": self.key,
            "file_name": file_name,
            "height": self.height,
            "width": self.width,
            "instances": [
                {
                    "label": int(label),
                    "name": name,
                    "score": float(score),
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"]},
                    "bbox": [float(v) for v in box],
                    "area": int(area),
                }
                for label, name, score, rle, box, area in zip(
                    self.labels, self.names, self.scores, self.rles, self.boxes(), areas
                )
            ],
        }


def coco_instances(results: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """A COCO instances document: image ids follow ``results``, category ``i + 1`` is class i."""
    images, annotations = [], []
    for image_id, result in enumerate(results, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": result["file_name"],
                "height": result["height"],
                "width": result["width"],
            }
        )
        for instance in result["instances"]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": instance["label"] + 1,
                    "segmentation": instance["segmentation"],
                    "area": instance["area"],
                    "bbox": instance["bbox"],
                    "iscrowd": 0,
                    "score": instance["score"],
                }
            )
    return {
        "info": {"description": "instances annotated by usam (U-SAM) from class names"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
    }


def _save_atomic(image: Image.Image, path: Path, **options: Any) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"), **options)
    os.replace(tmp, path)


def save_semantic(semantic: np.ndarray, path: Path) -> None:
    """A palette PNG whose pixel values are the labels, drawn in VOC's colours."""
    png = Image.fromarray(np.asarray(semantic, dtype=np.uint8), mode="P")
    png.putpalette(PALETTE.flatten().tolist())
    _save_atomic(png, path)


def save_overlay(image: np.ndarray, annotation: Annotation, classes: Sequence[str], path: Path):
    """The labels blended over the photo, with a legend of the classes it shows."""
    names = [BACKGROUND, *classes]
    shown = sorted(set(np.unique(annotation.semantic).tolist()) - {0})
    legend = legend_strip([0, *shown], names, annotation.width)
    sheet = Image.new("RGB", (annotation.width, annotation.height + legend.height), "white")
    sheet.paste(Image.fromarray(blend(image, annotation.semantic)), (0, 0))
    sheet.paste(legend, (0, annotation.height))
    _save_atomic(sheet, path, quality=90)


def save_legend(classes: Sequence[str], path: Path) -> None:
    """Every class's colour, as in the semantic PNGs."""
    names = [BACKGROUND, *classes]
    _save_atomic(legend_strip(range(len(names)), names, LEGEND_WIDTH), path)


def polygon_of(mask: np.ndarray) -> np.ndarray:
    """The outline of a mask's largest part, (P, 2) x, y; YOLO-seg takes one polygon a line."""
    try:
        import cv2
    except ImportError as error:
        raise RuntimeError(
            "YOLO-seg labels need OpenCV to trace mask outlines: install "
            "opencv-python-headless, or set yolo=false"
        ) from error
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if not contours:
        return np.zeros((0, 2))
    return max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64)


def save_yolo(annotation: Annotation, path: Path) -> None:
    """``class x1 y1 x2 y2 ...`` per instance, coordinates as fractions of the image size."""
    lines = []
    scale = np.array([annotation.width, annotation.height], dtype=np.float64)
    for label, mask in zip(annotation.labels, annotation.masks()):
        polygon = polygon_of(mask)
        if len(polygon) >= 3:  # fewer points enclose no area
            coords = " ".join(f"{v:.6f}" for v in (polygon / scale).flatten())
            lines.append(f"{int(label)} {coords}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def write_result(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result))
