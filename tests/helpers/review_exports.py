"""Predictions of given masks, and reading the Label Studio and CVAT exports back the way
those tools do, with their own decoders: the Label Studio SDK's brush RLE and the CVAT SDK's
mask RLE."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from cvat_sdk.masks import decode_mask
from label_studio_sdk.converter import brush
from pycocotools import mask as mask_utils

from usam.inference.predictor import Prediction


def label_studio_brush_masks(task: dict) -> list[tuple[str, np.ndarray]]:
    """(class name, (H, W) bool) of every brush region of a task's first prediction: the
    alpha channel of the RGBA image Label Studio's RLE holds."""
    found = []
    for region in task["predictions"][0]["result"]:
        if region["type"] != "brushlabels":
            continue
        height, width = region["original_height"], region["original_width"]
        rgba = brush.decode_rle(region["value"]["rle"]).reshape(height, width, 4)
        assert set(np.unique(rgba).tolist()) <= {0, 255}  # 0/255: a 0/1 mask is invisible
        found.append((region["value"]["brushlabels"][0], rgba[..., 3] == 255))
    return found


def cvat_masks(path: Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Image name -> (label, (H, W) bool) per ``<mask>``, each turned into the points of a
    CVAT mask shape as CVAT's importer does (the run lengths, then left, top, right,
    bottom) and decoded by the CVAT SDK."""
    found = {}
    for image in ET.parse(path).getroot().iter("image"):
        width, height = int(image.get("width")), int(image.get("height"))
        shapes = []
        for mask in image.iter("mask"):
            left, top = int(mask.get("left")), int(mask.get("top"))
            right = left + int(mask.get("width")) - 1
            bottom = top + int(mask.get("height")) - 1
            points = [int(v) for v in mask.get("rle").split(",")] + [left, top, right, bottom]
            bitmap = decode_mask(points, image_width=width, image_height=height)
            shapes.append((mask.get("label"), bitmap))
        found[image.get("name")] = shapes
    return found


def prediction_of(masks: np.ndarray, labels, key: str = "image") -> Prediction:
    """A Prediction holding ``masks`` (K, H, W) with scores 0.9 down to 0.5."""
    masks = np.asarray(masks, dtype=bool)
    rles = []
    for mask in masks:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rles.append({"size": rle["size"], "counts": rle["counts"].decode()})
    height, width = masks.shape[1:]
    count = len(labels)
    return Prediction(
        key=key,
        height=height,
        width=width,
        rles=rles,
        labels=np.asarray(labels, dtype=np.int64),
        scores=np.linspace(0.9, 0.5, count).astype(np.float32),
        entropies=np.linspace(0.1, 0.3, count).astype(np.float32),
        mask_indices=np.arange(count, dtype=np.int64),
    )
