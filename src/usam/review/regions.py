"""What every review reader checks of one region: its class, its polygon, that it has pixels.

A check that fails raises :class:`UnusableRegion` with the reason, which the reader turns
into the region's line in ``Review.skipped``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils


class UnusableRegion(Exception):
    """Why one region is left out; its reader names the file, image and region."""


def class_index(names: Sequence[str], classes: Sequence[str]) -> int:
    """The 0-based class of a region's labels: exactly one, and one of ``classes``."""
    if len(names) != 1:
        listed = f" ({', '.join(map(str, names))})" if names else ""
        raise UnusableRegion(f"{len(names)} labels{listed}, one is needed")
    (name,) = names
    if name not in classes:
        raise UnusableRegion(f"label '{name}' is not one of the classes ({', '.join(classes)})")
    return list(classes).index(name)


def polygon_mask(
    points: object, height: int, width: int, unit: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """(H, W) bool of a polygon of (x, y) points, ``unit`` pixels each (Label Studio's are
    percent of the image), filled as COCO fills polygons.

    Pixel (r, c) spans [c, c + 1) x [r, r + 1), the convention
    ``usam.inference.polygons`` outlines masks in, so its outlines fill back to exactly the
    mask they were traced from.
    """
    try:
        corners = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise UnusableRegion("malformed points (not numbers)") from error
    if corners.ndim != 2 or corners.shape[1] != 2 or not np.isfinite(corners).all():
        raise UnusableRegion("malformed points (not a list of x, y pairs)")
    if len(corners) < 3:
        raise UnusableRegion(f"a polygon of {len(corners)} points, at least 3 are needed")
    pixels = corners * np.asarray(unit, dtype=np.float64)
    rles = mask_utils.frPyObjects([pixels.ravel().tolist()], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def with_pixels(mask: np.ndarray) -> np.ndarray:
    """``mask``, unless it has no pixel: an empty region marks nothing to learn from."""
    if not mask.any():
        raise UnusableRegion("empty mask")
    return mask
