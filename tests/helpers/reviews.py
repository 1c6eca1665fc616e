"""Reviews as the tools hand them back: usam's exports turned into what Label Studio exports
once a reviewer submitted each prediction, regions written by hand, images on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from label_studio_sdk.converter import brush
from PIL import Image

from usam.inference.exports import LabelledImage

from helpers.review_exports import prediction_of


def reviewed_images() -> list[LabelledImage]:
    """Three images: a ring (a hole), two parts, a corner pixel; a full frame; nothing."""
    first = np.zeros((3, 40, 50), bool)
    first[0, 5:20, 5:25] = True
    first[0, 9:14, 10:15] = False  # a hole
    first[1, 25:30, 2:8] = first[1, 32:38, 30:48] = True  # two parts
    first[2, 39, 49] = True  # the last pixel only
    second = np.ones((1, 17, 23), bool)
    nothing = np.zeros((0, 30, 20), bool)
    return [
        LabelledImage("a/first.png", prediction_of(first, [0, 2, 1], "first")),
        LabelledImage("second.png", prediction_of(second, [1], "second")),
        LabelledImage("empty.png", prediction_of(nothing, [], "empty")),
    ]


def submitted(tasks: list[dict]) -> list[dict]:
    """Label Studio's JSON export of ``tasks`` once each prediction was submitted as is."""
    return [
        task
        | {
            "id": number,
            "annotations": [
                {
                    "id": 100 + number,
                    "result": task["predictions"][0]["result"],
                    "was_cancelled": False,
                    "updated_at": "2026-01-01T10:00:00Z",
                }
            ],
        }
        for number, task in enumerate(tasks, start=1)
    ]


def write_export(folder: Path, tasks: list[dict]) -> Path:
    path = folder / "export.json"
    path.write_text(json.dumps(tasks))
    return path


def brush_region(region_id: str, mask: np.ndarray, labels: list[str]) -> dict:
    """A brush region as Label Studio stores it: the mask as 0/255 RGBA in its RLE."""
    height, width = mask.shape
    return {
        "id": region_id,
        "type": "brushlabels",
        "original_height": height,
        "original_width": width,
        "value": {"format": "rle", "rle": brush.mask2rle(mask.astype(np.uint8) * 255)}
        | {"brushlabels": labels},
    }


def polygon_region(region_id: str, points: list, labels: list[str], size: tuple) -> dict:
    """A polygon region; ``points`` in percent of the (height, width) ``size``."""
    return {
        "id": region_id,
        "type": "polygonlabels",
        "original_height": size[0],
        "original_width": size[1],
        "value": {"points": points, "closed": True, "polygonlabels": labels},
    }


def save_images(root: Path, sizes: dict[str, tuple[int, int]]) -> None:
    """A grey PNG of each (width, height) at its name under ``root``."""
    for name, size in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (128, 128, 128)).save(root / name)


def drawn(seed: int, step: int = 4) -> np.ndarray:
    """Two flat rectangles on a flat background, moved ``step`` pixels per ``seed``: images
    the tiny SAM gives a few distinct masks."""
    image = np.full((48, 64, 3), 40, np.uint8)
    shift = step * seed
    image[8 + shift : 30, 6 : 30 + shift] = (200, 60, 60)
    image[20:44, 36 - shift : 60] = (60, 60, 200)
    return image
