"""A "CVAT for images 1.1" XML export as a Review.

``<mask>`` shapes are decoded by the CVAT SDK (CVAT's RLE over the shape's box, the inverse
of the encoding ``usam.inference.cvat`` writes with) and ``<polygon>`` shapes, in pixel
coordinates, fill as COCO fills polygons. Boxes, polylines, points, ellipses, tags and the
rest get a line each. CVAT exports every image of a task, so an image without shapes is a
reviewed image with no objects.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from cvat_sdk.masks import decode_mask

from usam.review.regions import UnusableRegion, class_index, polygon_mask, with_pixels
from usam.review.reviewed import Review, ReviewedImage, ReviewError

REEXPORT = "export the task again from CVAT as 'CVAT for images 1.1'"


def review_of_cvat(path: Path, classes: Sequence[str]) -> Review:
    """The reviewed images of the XML at ``path``; ReviewError when it is not such XML."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ReviewError(f"{path} is not well-formed XML ({error}); {REEXPORT}") from error
    except OSError as error:
        raise ReviewError(f"cannot read {path}: {error.strerror}") from error
    if root.tag != "annotations":
        raise ReviewError(f"{path} has <{root.tag}> where <annotations> should be; {REEXPORT}")
    classes = tuple(classes)
    images, skipped = [], []
    for element in root.iter("image"):
        name = element.get("name")
        try:
            height, width = int(element.get("height")), int(element.get("width"))
        except (TypeError, ValueError):
            skipped.append(f"image {name}: no width and height, skipped")
            continue
        labels, masks = [], []
        for position, shape in enumerate(element, start=1):
            try:
                label, mask = _shape(shape, classes, height, width)
            except UnusableRegion as reason:
                what = f"{shape.tag} '{shape.get('label')}'"
                skipped.append(f"image {name} shape {position} ({what}): {reason}, skipped")
                continue
            labels.append(label)
            masks.append(mask)
        masks = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        images.append(ReviewedImage(name, height, width, masks, np.array(labels, np.int64)))
    return Review(str(path), classes, tuple(images), tuple(skipped))


def _shape(
    shape: ET.Element, classes: tuple[str, ...], height: int, width: int
) -> tuple[int, np.ndarray]:
    if shape.tag not in ("mask", "polygon"):
        raise UnusableRegion("only mask and polygon shapes are read")
    label = class_index([shape.get("label")], classes)
    return label, with_pixels(_mask(shape, height, width))


def _mask(shape: ET.Element, height: int, width: int) -> np.ndarray:
    if shape.tag == "polygon":
        points = [corner.split(",") for corner in shape.get("points", "").split(";")]
        return polygon_mask(points, height, width)
    try:
        left, top = int(shape.get("left")), int(shape.get("top"))
        right = left + int(shape.get("width")) - 1
        bottom = top + int(shape.get("height")) - 1
        runs = [int(run) for run in shape.get("rle").split(",")]
        return decode_mask(
            runs + [left, top, right, bottom], image_width=width, image_height=height
        )
    except (TypeError, ValueError, AttributeError) as error:
        raise UnusableRegion(f"malformed mask ({error})") from error
