"""The official SAM generator as the reference the mask engine is held to, under exact
mode's contract: differences no larger than float32 rounding can make.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from usam.sam.mask_engine import PointGridEngine
from usam.testing.agreement import OfficialComparison, compare_with_official


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


def assert_matches_official(ours, engine: PointGridEngine, image) -> OfficialComparison:
    """Exact mode's contract (``usam.sam.mask_engine``) against the official generator
    of ``engine``'s model, run with ``engine``'s settings.
    """
    report = compare_with_official(ours, official(engine, image), engine, image)
    assert report.holds, "\n".join(report.violations[:20])
    assert report.paired >= report.official_masks - report.near_ties
    return report
