"""The official SAM generator as the reference the mask engine is held to, under exact
mode's contract: differences no larger than float32 rounding can make.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from usam.sam.mask_engine import PointGridEngine
from usam.testing.agreement import (
    OfficialComparison,
    compare_with_official,
    point_ious,
    score_tolerance,
)


def shapes_image(height: int, width: int, seed: int) -> np.ndarray:
    """Flat background with a few coloured discs and squares: regions SAM can split."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(6):
        color = rng.integers(0, 256, 3)
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        r = rng.integers(height // 10, height // 3)
        if rng.random() < 0.5:
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = color
        else:
            image[max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r] = color
    return image


def photo_folder(root: Path, count: int = 2) -> Path:
    """A folder of ``count`` shapes photos (96 x 128 PNG), as a user's images for a command."""
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(shapes_image(96, 128, i)).save(root / f"photo{i}.png")
    return root


def official(engine: PointGridEngine, image) -> list[dict]:
    return engine.reference_masks(image)


def assert_matches_official(
    ours, engine: PointGridEngine, image, *, min_paired: int
) -> OfficialComparison:
    """Exact mode's contract (``usam.sam.mask_engine``) against the official generator
    of ``engine``'s model, run with ``engine``'s settings, over at least ``min_paired``
    pairs of masks: a comparison of nothing would hold too.
    """
    report = compare_with_official(ours, official(engine, image), engine, image)
    assert report.holds, "\n".join(report.violations[:20])
    assert report.paired >= report.official_masks - report.near_ties
    assert report.paired >= min_paired, f"{report.paired} pairs compared"
    return report


def from_crop_layers(masks, engine: PointGridEngine) -> int:
    """How many of ``masks`` come from a crop layer: their point is off the full image's grid."""
    full_image = engine.point_grids[0] * [masks.width, masks.height]
    return sum(not np.isclose(full_image, point).all(axis=1).any() for point in masks.points)


def filter_threshold_in_gap(engine: PointGridEngine, image, quantile: float) -> float:
    """An IoU-filter threshold near ``quantile`` of the full-image candidates' predicted
    IoUs, midway in a gap of at least 20 times the contract's score tolerance: the filter
    drops masks, and none is kept or dropped by a near-tie a mutation could hide behind.
    """
    ious = np.unique(point_ious(engine, image))
    gap = 20 * score_tolerance(1.0)
    start = int(quantile * len(ious))
    for low, high in zip(ious[start:], ious[start + 1 :]):
        if high - low > gap:
            return float((low + high) / 2)
    raise AssertionError(f"no gap of {gap} between the predicted IoUs above {ious[start]}")
