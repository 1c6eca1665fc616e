"""The official predictor's logits of single point prompts, as the contract check
(``usam.testing.agreement``) consults them: each crop's image encoding is made once, and
only when something differs between the official masks and ours.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import build_all_layer_point_grids, generate_crop_boxes

from usam.sam.amg_settings import AmgSettings
from usam.sam.mask_engine import PointGridEngine

LOGIT_RTOL = 1e-4  # of max(1, largest |logit| of the mask): pixels that may flip


class OfficialLogits:
    """Full-image logits of single point prompts from the backend's official predictor."""

    def __init__(self, engine: PointGridEngine, image: np.ndarray) -> None:
        self.engine, self.image, self.settings = engine, image, engine.settings
        self.threshold = engine.mask_threshold
        self._predictors: dict[tuple[int, ...], Callable[[np.ndarray], np.ndarray]] = {}
        self._logits: dict[tuple, np.ndarray] = {}
        self._crops = _crop_points(image.shape[:2], engine.settings)

    def crop_of(self, point: np.ndarray) -> tuple[int, ...]:
        """The XYXY crop box whose point grid holds ``point``."""
        for box, points in self._crops:
            if np.isclose(points, point).all(axis=1).any():
                return box
        raise ValueError(f"point {point.tolist()} is on no crop's point grid")

    def __call__(self, point: np.ndarray, crop_box) -> np.ndarray:
        """(3, H, W) logits of the multimask outputs, -inf outside the XYXY crop."""
        crop_box = tuple(int(v) for v in crop_box)
        key = (*np.asarray(point, float).tolist(), *crop_box)
        if key not in self._logits:
            x0, y0, x1, y1 = crop_box
            if crop_box not in self._predictors:
                crop = np.ascontiguousarray(self.image[y0:y1, x0:x1])
                self._predictors[crop_box] = self.engine.official_point_logits(crop)
            logits = self._predictors[crop_box](np.asarray(point, float) - [x0, y0])
            full = np.full((3, *self.image.shape[:2]), -np.inf, np.float32)
            full[:, y0:y1, x0:x1] = logits
            self._logits[key] = full
        return self._logits[key]

    def closest_output(self, point_logits: np.ndarray, rle: dict) -> int:
        """The output a mask comes from, where its record does not say (the official one)."""
        binary = mask_utils.decode(rle).astype(bool)
        return int(np.argmin([(binary != (p > self.threshold)).sum() for p in point_logits]))

    def box_range(self, logits: np.ndarray, rle: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """Inner and outer XYXY box of the mask ``rle`` (None: the logits' own mask, before
        any small-region cleanup) when its pixels within tolerance of the threshold flip."""
        tol = self.tolerance(logits)
        if rle is None:
            inner, outer = logits > self.threshold + tol, logits > self.threshold - tol
        else:
            mask = mask_utils.decode(rle).astype(bool)
            near = np.abs(logits - self.threshold) <= tol
            inner, outer = mask & ~near, mask | near
        return mask_box(inner), mask_box(outer)

    def tolerance(self, logits: np.ndarray) -> float:
        return LOGIT_RTOL * max(1.0, float(np.abs(logits[np.isfinite(logits)]).max()))

    def allows_stability(self, logits: np.ndarray, score: float) -> bool:
        """Whether pixels within tolerance of threshold +- offset allow stability ``score``
        (NaN for an empty mask, as the official 0 / 0).
        """
        tol, threshold = self.tolerance(logits), self.threshold
        offset = self.settings.stability_score_offset
        inter = [int((logits > threshold + offset + d).sum()) for d in (tol, -tol)]
        union = [int((logits > threshold - offset + d).sum()) for d in (tol, -tol)]
        if np.isnan(score):
            return union[0] == 0
        low, high = inter[0] / max(union[1], 1), inter[1] / max(union[0], 1)
        return low - 1e-6 <= score <= high + 1e-6


def _crop_points(size, settings: AmgSettings) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Each XYXY crop box with its point prompts in image pixels, as the official generator."""
    grids = build_all_layer_point_grids(
        settings.points_per_side, settings.crop_n_layers, settings.crop_n_points_downscale_factor
    )
    boxes, layers = generate_crop_boxes(size, settings.crop_n_layers, settings.crop_overlap_ratio)
    return [
        (tuple(box), grids[layer] * [box[2] - box[0], box[3] - box[1]] + box[:2])
        for box, layer in zip(boxes, layers)
    ]


def mask_box(mask: np.ndarray) -> np.ndarray:
    """XYXY box with inclusive edges, as the official ``batched_mask_to_box``; 0s if empty."""
    if not mask.any():
        return np.zeros(4)
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([xs[0], ys[0], xs[-1], ys[-1]], float)
