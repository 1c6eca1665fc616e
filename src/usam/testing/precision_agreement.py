"""How far masks made with ``amg.precision=bf16`` lie from the fp32 masks of the same point
prompts: what ``benchmarks/bf16_agreement.py`` prints and the tests bound. bf16 is outside
exact mode's contract (``usam.sam.mask_engine``), so its agreement is measured, not held
to float32 rounding.

Both sides are made with ``proposals: one_per_point`` (one mask per grid point, nothing
filtered), so that every point prompt has exactly one mask on each side to pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from usam.sam.mask_engine import ImageMasks


@dataclass(frozen=True)
class PrecisionAgreement:
    """Per point prompt, in the reference's order."""

    ious: np.ndarray  # mask IoU of the other side's mask with the reference's
    same_output: np.ndarray  # bool: both chose the same multimask output
    iou_pred_diffs: np.ndarray  # |predicted IoU difference| of the masks paired

    @property
    def median_iou(self) -> float:
        return float(np.median(self.ious))

    def share_above(self, iou: float) -> float:
        """The share of point prompts whose masks overlap by more than ``iou``."""
        return float(np.mean(self.ious > iou))


def compare_precisions(reference: ImageMasks, other: ImageMasks) -> PrecisionAgreement:
    """Pairs each of ``reference``'s masks with ``other``'s of the same point prompt."""
    position = {tuple(point): i for i, point in enumerate(other.points.tolist())}
    points = [tuple(point) for point in reference.points.tolist()]
    if len(position) != len(other) or sorted(position) != sorted(points):
        raise ValueError(
            "the two sides do not hold one mask per point prompt of the same grid; make both "
            "with proposals=one_per_point and the same points_per_side"
        )
    order = [position[point] for point in points]
    size = [reference.height, reference.width]
    ious = np.array(
        [
            mask_utils.iou(
                [{"size": size, "counts": other.rles[j]}],
                [{"size": size, "counts": rle}],
                [0],
            )[0, 0]
            for rle, j in zip(reference.rles, order)
        ]
    )
    return PrecisionAgreement(
        ious=ious,
        same_output=reference.multimask == other.multimask[order],
        iou_pred_diffs=np.abs(reference.iou_preds - other.iou_preds[order]),
    )
