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
from usam.formats.embedding_shards import decode_masks, encode_mask
from usam.formats.storage import atomic_write_text
from usam.viz.overlays import PALETTE, blend, legend_strip

LEGEND_WIDTH = 640


@dataclass
class Annotation:
    """Kept instances (those with pixels) of one image and its semantic map
    (0 background, ``label + 1``)."""

    key: str
    height: int
    width: int
    rles: list[dict[str, Any]]  # pycocotools RLE, ``counts`` a str
    labels: np.ndarray  # 0-based class indices
    names: list[str]  # class name of each instance
    scores: np.ndarray
    semantic: np.ndarray  # (H, W) uint8

    def __post_init__(self) -> None:
        """An instance without pixels is no instance: no export carries one."""
        if not self.rles:
            return
        keep = mask_utils.area(self.rles) > 0
        self.rles = [rle for rle, kept in zip(self.rles, keep) if kept]
        self.labels = np.asarray(self.labels)[keep]
        self.names = [name for name, kept in zip(self.names, keep) if kept]
        self.scores = np.asarray(self.scores)[keep]

    def resized(self, height: int, width: int) -> Annotation:
        """The same instances on a (height, width) grid: masks of an image SAM saw scaled
        down, written back at the file's size (nearest neighbour, as label maps are)."""
        size = (width, height)
        masks = [
            np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
            for mask in self.masks().astype(np.uint8)
        ]
        semantic = Image.fromarray(self.semantic).resize(size, Image.Resampling.NEAREST)
        return Annotation(
            key=self.key,
            height=height,
            width=width,
            rles=[encode_mask(mask) for mask in masks],
            labels=self.labels,
            names=self.names,
            scores=self.scores,
            semantic=np.asarray(semantic),
        )

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


def _boundary_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Closed loops of pixel edges around a mask's regions and holes, (K, 2) x, y corners each.

    Every edge between a mask pixel and a non-mask pixel is walked with the mask on
    its right; where two regions touch only at a corner the walk turns left, so
    diagonal neighbours share a loop (8-connectivity, as the readers' components).
    Only the corners where the walk turns are kept.
    """
    mask = np.asarray(mask, dtype=bool)
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not rows.size:
        return []
    top, left = rows[0], columns[0]  # walk the bounding box only: masks are mostly empty
    mask = mask[top : rows[-1] + 1, left : columns[-1] + 1]
    padded = np.pad(mask, 1)
    stride = mask.shape[1] + 1  # vertex (x, y) has id y * stride + x
    starts, directions = [], []
    # direction 0 east, 1 south, 2 west, 3 north; the offsets give each edge's start corner
    for direction, outside, (dx, dy) in (
        (0, padded[:-2, 1:-1], (0, 0)),  # top edge, walked east
        (1, padded[1:-1, 2:], (1, 0)),  # right edge, walked south
        (2, padded[2:, 1:-1], (1, 1)),  # bottom edge, walked west
        (3, padded[1:-1, :-2], (0, 1)),  # left edge, walked north
    ):
        rows, columns = np.nonzero(mask & ~outside)
        starts.append((rows + dy) * stride + columns + dx)
        directions.append(np.full(len(rows), direction))
    start, direction = np.concatenate(starts), np.concatenate(directions)
    end = start + np.array([1, stride, -1, -stride])[direction]
    order = np.argsort(start, kind="stable")
    first = np.searchsorted(start[order], end)
    following = order[first]
    other = order[np.minimum(first + 1, len(order) - 1)]
    saddle = start[other] == end  # a second edge leaves the corner
    turn_left = saddle & (direction[other] == (direction - 1) % 4)
    following = np.where(turn_left, other, following)
    following, seen = following.tolist(), bytearray(len(start))
    loops = []
    for origin in range(len(start)):
        if seen[origin]:
            continue
        edges, edge = [], origin
        while not seen[edge]:
            seen[edge] = 1
            edges.append(edge)
            edge = following[edge]
        edges = np.array(edges)
        corners = edges[direction[edges] != direction[np.roll(edges, 1)]]
        x, y = start[corners] % stride + left, start[corners] // stride + top
        loops.append(np.stack([x, y], axis=1))
    return loops


def _area(loop: np.ndarray) -> float:
    """Shoelace area; positive for the outside of a region, negative for a hole."""
    x, y = loop[:, 0].astype(np.float64), loop[:, 1].astype(np.float64)
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2


def polygon_of(mask: np.ndarray) -> np.ndarray:
    """One closed outline of a whole mask, (P, 2) x, y on pixel corners.

    Corners, not pixel centres: in COCO's convention (which the YOLO-seg reader
    rasterises with) pixel (r, c) spans [c, c + 1) x [r, r + 1), so an outline
    through the centres would lose half a pixel all round. YOLO-seg takes one
    polygon an instance, so every other region and hole is joined to the largest
    region by a bridge walked there and back: under the even-odd rule the two
    passes cancel, and the polygon rasterises back to exactly the mask.
    """
    loops = sorted(_boundary_loops(mask), key=lambda loop: -abs(_area(loop)))
    if not loops:
        return np.zeros((0, 2))
    outline = loops[0]
    detours: dict[int, list[np.ndarray]] = {}  # outline vertex -> loops entered from it
    for loop in loops[1:]:
        distance = ((outline[:, None, :] - loop[None, :, :]) ** 2).sum(-1)
        at, entry = np.unravel_index(distance.argmin(), distance.shape)
        around = np.roll(loop, -entry, axis=0)
        detours.setdefault(int(at), []).append(np.concatenate([around, around[:1]]))
    points = []
    for index, vertex in enumerate(outline):
        points.append(vertex[None])
        for detour in detours.get(index, []):
            points += [detour, vertex[None]]
    return np.concatenate(points).astype(np.float64)


def save_yolo(annotation: Annotation, path: Path) -> None:
    """``class x1 y1 x2 y2 ...`` per instance, coordinates as fractions of the image size."""
    lines = []
    scale = np.array([annotation.width, annotation.height], dtype=np.float64)
    for label, mask in zip(annotation.labels, annotation.masks()):
        coords = " ".join(f"{v:.6f}" for v in (polygon_of(mask) / scale).flatten())
        lines.append(f"{int(label)} {coords}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def write_result(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result))
