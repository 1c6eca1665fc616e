"""The official SAM generator as the reference the mask engine is held to."""

from __future__ import annotations

import numpy as np
from segment_anything import SamAutomaticMaskGenerator

from usam.sam.amg_settings import AmgSettings


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


def official(sam, image, settings: AmgSettings) -> list[dict]:
    generator = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **settings.as_kwargs())
    return generator.generate(image)


def assert_same(ours, theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    assert ours.rles == [t["segmentation"]["counts"] for t in theirs]
    assert all(t["segmentation"]["size"] == [ours.height, ours.width] for t in theirs)
    assert ours.boxes.tolist() == [t["bbox"] for t in theirs]
    assert ours.areas.tolist() == [t["area"] for t in theirs]
    assert ours.iou_preds.tolist() == [t["predicted_iou"] for t in theirs]
    np.testing.assert_array_equal(
        ours.stability, np.array([t["stability_score"] for t in theirs], np.float32)
    )
    assert ours.points.tolist() == [t["point_coords"][0] for t in theirs]
