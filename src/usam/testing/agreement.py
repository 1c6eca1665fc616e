"""How closely usam's masks reproduce the official generator's.

:func:`compare_with_official` checks exact mode's contract (stated in
``usam.sam.mask_engine``): differences no larger than float32 rounding can make. Where
a mask pixel, a stability score or a keep/drop decision differs, it asks the backend's
official predictor for the logits of that one point prompt and checks that the difference
sits within ``LOGIT_RTOL`` of a threshold; that costs an image encoding per crop, and
only when something differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import build_all_layer_point_grids, generate_crop_boxes

from usam.sam.amg_settings import AmgSettings
from usam.sam.mask_engine import ImageMasks, PointGridEngine

LOGIT_RTOL = 1e-4  # of max(1, largest |logit| of the mask): pixels that may flip
SCORE_RTOL = 1e-5  # of max(1, |score|): predicted IoU differences allowed


def score_tolerance(score: float) -> float:
    return SCORE_RTOL * max(1.0, abs(score))


@dataclass
class OfficialComparison:
    """Ours against the official generator's output for one image, under the contract."""

    official_masks: int
    our_masks: int
    paired: int = 0  # official masks with one of ours from the same point prompt
    identical_masks: int = 0  # pairs with bit-identical masks
    identical_scores: int = 0  # pairs with bit-identical predicted IoU and stability
    max_iou_pred_diff: float = 0.0
    max_stability_diff: float = 0.0
    differing_pixels: int = 0  # over the pairs
    pixels_near_threshold: int = 0  # of those, within LOGIT_RTOL of the mask threshold
    near_ties: int = 0  # unpaired masks explained by a threshold or NMS near-tie
    violations: list[str] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return not self.violations

    @property
    def identical_share(self) -> float:
        return self.identical_masks / self.official_masks if self.official_masks else 1.0


class _OfficialLogits:
    """Full-image logits of single point prompts from the backend's official predictor."""

    def __init__(self, engine: PointGridEngine, image: np.ndarray) -> None:
        self.engine, self.image, self.settings = engine, image, engine.settings
        self.threshold = engine.mask_threshold
        self._predictors: dict[tuple[int, ...], Callable[[np.ndarray], np.ndarray]] = {}
        self._crops = _crop_points(image.shape[:2], engine.settings)

    def crop_of(self, point: np.ndarray) -> tuple[int, ...]:
        for box, points in self._crops:
            if np.isclose(points, point).all(axis=1).any():
                return box
        raise ValueError(f"point {point.tolist()} is on no crop's point grid")

    def __call__(self, point: np.ndarray, crop_box) -> np.ndarray:
        """(3, H, W) logits of the multimask outputs, -inf outside the crop."""
        crop_box = tuple(int(v) for v in crop_box)
        x0, y0, x1, y1 = crop_box
        if crop_box not in self._predictors:
            crop = np.ascontiguousarray(self.image[y0:y1, x0:x1])
            self._predictors[crop_box] = self.engine.official_point_logits(crop)
        logits = self._predictors[crop_box](np.asarray(point, float) - [x0, y0])
        full = np.full((3, *self.image.shape[:2]), -np.inf, np.float32)
        full[:, y0:y1, x0:x1] = logits
        return full

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
    """Each crop box with its point prompts in image pixels, as the official generator."""
    grids = build_all_layer_point_grids(
        settings.points_per_side, settings.crop_n_layers, settings.crop_n_points_downscale_factor
    )
    boxes, layers = generate_crop_boxes(size, settings.crop_n_layers, settings.crop_overlap_ratio)
    return [
        (tuple(box), grids[layer] * [box[2] - box[0], box[3] - box[1]] + box[:2])
        for box, layer in zip(boxes, layers)
    ]


@dataclass
class _Mask:
    """One mask of either side, as the comparison needs it."""

    side: str  # "official" or "ours"
    index: int
    rle: dict
    iou: float
    stability: float
    point: np.ndarray
    box: np.ndarray  # XYWH
    area: int
    crop_box: tuple[int, ...] | None = None
    multimask: int | None = None
    partner: _Mask | None = None


def compare_with_official(
    ours: ImageMasks, official: list[dict], engine: PointGridEngine, image: np.ndarray
) -> OfficialComparison:
    """Check ``ours`` against ``official`` (``engine.reference_masks(image)``)."""
    settings = engine.settings
    report = OfficialComparison(official_masks=len(official), our_masks=len(ours))
    size = [ours.height, ours.width]
    theirs = [
        _Mask("official", i, o["segmentation"], float(o["predicted_iou"]),
              float(o["stability_score"]), np.asarray(o["point_coords"][0]),
              np.asarray(o["bbox"]), int(o["area"]), crop_box=tuple(o["crop_box"]))
        for i, o in enumerate(official)
    ]  # fmt: skip
    mine = [
        _Mask("ours", i, {"size": size, "counts": ours.rles[i]}, float(ours.iou_preds[i]),
              float(ours.stability[i]), ours.points[i], ours.boxes[i], int(ours.areas[i]),
              multimask=int(ours.multimask[i]))
        for i in range(len(ours))
    ]  # fmt: skip
    logits = _OfficialLogits(engine, image)
    _check_own_boxes(mine, report)
    _pair(theirs, mine)
    for o in theirs:
        if o.partner is not None:
            o.partner.crop_box = o.crop_box
            _check_pair(o, o.partner, logits, report)
    _check_unpaired(theirs, mine, logits, settings, report)
    _check_order(theirs, report)
    return report


def _check_own_boxes(mine: list[_Mask], report: OfficialComparison) -> None:
    """Our boxes (inclusive pixel edges, as the official ``bbox``) and areas are our masks'."""
    for m in mine:
        area = int(mask_utils.area(m.rle))
        box = mask_utils.toBbox(m.rle) - [0, 0, 1, 1] if area else np.zeros(4)
        if not np.array_equal(box, m.box) or area != m.area:
            report.violations.append(f"our mask {m.index}: box or area is not its mask's")


def _pair(theirs: list[_Mask], mine: list[_Mask]) -> None:
    """Each official mask to ours of the same point: the identical mask, else the closest
    predicted IoU within tolerance, else a mask of IoU >= 0.9 with it.
    """
    by_point: dict[tuple, list[_Mask]] = {}
    for m in mine:
        by_point.setdefault(tuple(m.point.tolist()), []).append(m)
    for o in theirs:
        free = [m for m in by_point.get(tuple(o.point.tolist()), []) if m.partner is None]
        same = [m for m in free if m.rle["counts"] == o.rle["counts"]]
        close = sorted(
            (m for m in free if abs(m.iou - o.iou) <= score_tolerance(o.iou)),
            key=lambda m: abs(m.iou - o.iou),
        )
        match = (same or close or [None])[0]
        if match is not None:
            o.partner, match.partner = match, o
    for o in theirs:  # the same mask with a score off: paired, so that the score is checked
        free = [m for m in by_point.get(tuple(o.point.tolist()), []) if m.partner is None]
        if o.partner is None and free:
            ious = mask_utils.iou([m.rle for m in free], [o.rle], [0])[:, 0]
            if ious.max() >= 0.9:
                match = free[int(ious.argmax())]
                o.partner, match.partner = match, o


def _check_pair(o: _Mask, m: _Mask, logits: _OfficialLogits, report: OfficialComparison) -> None:
    report.paired += 1
    iou_diff = abs(m.iou - o.iou)
    report.max_iou_pred_diff = max(report.max_iou_pred_diff, iou_diff)
    same_stability = _same_float32(o.stability, m.stability)
    if not same_stability:
        report.max_stability_diff = max(report.max_stability_diff, abs(m.stability - o.stability))
    report.identical_scores += bool(_same_float32(o.iou, m.iou) and same_stability)
    if iou_diff > score_tolerance(o.iou):
        report.violations.append(f"official mask {o.index}: predicted IoU off by {iou_diff:.3g}")
    if o.rle["counts"] == m.rle["counts"]:
        report.identical_masks += 1
        if same_stability:
            return
    point_logits = logits(o.point, o.crop_box)[m.multimask]
    tol = logits.tolerance(point_logits)
    differ = mask_utils.decode(o.rle) != mask_utils.decode(m.rle)
    near = np.abs(point_logits[differ] - logits.threshold) <= tol
    report.differing_pixels += int(differ.sum())
    report.pixels_near_threshold += int(near.sum())
    if not near.all():
        report.violations.append(
            f"official mask {o.index}: {int((~near).sum())} pixels differ whose logit is "
            f"further than {tol:.3g} from the threshold"
        )
    if not logits.allows_stability(point_logits, m.stability):
        report.violations.append(
            f"official mask {o.index}: stability {m.stability} against {o.stability} is more "
            "than pixels near threshold +- offset explain"
        )


def _same_float32(a: float, b: float) -> bool:
    """Bit-identical as float32; NaN (the stability of an empty mask) equals NaN."""
    return np.float32(a).tobytes() == np.float32(b).tobytes() or (np.isnan(a) and np.isnan(b))


def _check_unpaired(theirs, mine, logits: _OfficialLogits, settings, report) -> None:
    """Unpaired masks must sit near a threshold, or lose or win an NMS near-tie, or NMS
    against a mask so explained.
    """
    unpaired = [m for m in theirs + mine if m.partner is None]
    explained = [m for m in unpaired if _near_filter(m, logits, settings)]
    everyone = theirs + [m for m in mine if m.partner is None]
    changed = True
    while changed:
        changed = False
        for m in unpaired:
            if m not in explained and _near_nms(m, everyone, explained, settings):
                explained.append(m)
                changed = True
    report.near_ties = len(explained)
    for m in unpaired:
        if m not in explained:
            report.violations.append(
                f"{m.side} mask {m.index} (point {m.point.tolist()}, predicted IoU {m.iou:.6g}, "
                f"stability {m.stability:.6g}) has no counterpart and no near-tie explains it"
            )


def _near_filter(m: _Mask, logits: _OfficialLogits, settings: AmgSettings) -> bool:
    """Near a filter's threshold; a filter at 0 is off in the official generator."""
    iou_filter = settings.pred_iou_thresh > 0.0
    if iou_filter and abs(m.iou - settings.pred_iou_thresh) <= score_tolerance(m.iou):
        return True
    if settings.stability_score_thresh <= 0.0:
        return False
    crop_box = m.crop_box or logits.crop_of(m.point)
    point_logits = logits(m.point, crop_box)
    if m.multimask is None:  # the official output leaves it out: the closest output
        binary = mask_utils.decode(m.rle).astype(bool)
        m.multimask = int(np.argmin([(binary != (p > 0)).sum() for p in point_logits]))
    return logits.allows_stability(point_logits[m.multimask], settings.stability_score_thresh)


def _near_nms(m: _Mask, everyone, explained, settings: AmgSettings) -> bool:
    """Near an NMS decision: box NMS below 1 (at 1 it keeps every box), and crop NMS only
    when there are crops."""
    thresholds = {settings.box_nms_thresh} if settings.box_nms_thresh < 1.0 else set()
    if settings.crop_n_layers > 0:
        thresholds.add(settings.crop_nms_thresh)
    if not thresholds:
        return False
    lowest = min(thresholds)
    for n in everyone:
        if n is m or n is m.partner:
            continue
        low, high = _box_iou_range(m.box, n.box)
        if high < lowest:
            continue
        near_box = any(low <= t <= high for t in thresholds)
        near_score = abs(m.iou - n.iou) <= score_tolerance(m.iou)
        if near_box or near_score or n in explained:
            return True
    return False


def _box_iou_range(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Box IoU of XYWH boxes when each edge may move by one pixel either way."""
    a, b = (np.array([x, y, x + w, y + h], float) for x, y, w, h in (a, b))
    shrink, grow = np.array([1.0, 1.0, -1.0, -1.0]), np.array([-1.0, -1.0, 1.0, 1.0])

    def area(box):
        return float(np.clip(box[2:] - box[:2], 0, None).prod())

    def inter(p, q):
        return area(np.concatenate([np.maximum(p[:2], q[:2]), np.minimum(p[2:], q[2:])]))

    inter_low, inter_high = inter(a + shrink, b + shrink), inter(a + grow, b + grow)
    union_high = area(a + grow) + area(b + grow) - inter_low
    union_low = max(
        area(a + shrink), area(b + shrink), area(a + shrink) + area(b + shrink) - inter_high, 1e-9
    )
    return inter_low / max(union_high, 1e-9), min(1.0, inter_high / union_low)


def _check_order(theirs: list[_Mask], report: OfficialComparison) -> None:
    """Paired masks in the official order, but for swaps among near-tied predicted IoUs."""
    pairs = [(o, o.partner) for o in theirs if o.partner is not None]
    for a, (o, m) in enumerate(pairs):
        for o2, m2 in pairs[a + 1 :]:
            if m2.index < m.index and abs(o.iou - o2.iou) > score_tolerance(o.iou):
                report.violations.append(
                    f"official masks {o.index} and {o2.index} come in the other order"
                )


@torch.inference_mode()
def point_ious(engine: PointGridEngine, image: np.ndarray) -> np.ndarray:
    """Predicted IoU of every multimask output on the full-image grid, before any filter:
    for choosing ``pred_iou_thresh`` by the share of masks it lets through.
    """
    engine.set_image(image)
    points = engine.point_grids[0] * np.array(image.shape[:2])[None, ::-1]
    step = engine.settings.points_per_batch
    ious = [
        engine.decode(points[i : i + step], image.shape[:2]).iou_preds.flatten().cpu()
        for i in range(0, len(points), step)
    ]
    engine.reset_image()
    return torch.cat(ious).numpy()
