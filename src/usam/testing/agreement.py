"""How closely usam's masks reproduce the official generator's.

:func:`compare_with_official` checks exact mode's contract (stated in
``usam.sam.mask_engine``): differences no larger than float32 rounding can make. Where
a mask pixel, a stability score or a keep/drop decision differs, it asks the backend's
official predictor for the logits of that one point prompt and checks that the difference
sits within ``LOGIT_RTOL`` of a threshold; that costs an image encoding per crop, and
only when something differs.

A mask on one side only is excused by a filter's threshold within tolerance, or by an NMS
decision that can go either way (:func:`_lost_to_nms`): on the other side a kept mask
outranks it and overlaps it above the threshold, where on its own side that mask is
absent or overlaps it at most at the threshold. A duplicate, or a mask simply dropped,
has no such suppressor; and no two of our masks may overlap above the threshold of the
last NMS pass, which keeps only one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from usam.sam.amg_settings import AmgSettings
from usam.sam.mask_engine import ImageMasks, PointGridEngine
from usam.testing.official_logits import LOGIT_RTOL, OfficialLogits

__all__ = [  # LOGIT_RTOL lives with the logits it bounds
    "LOGIT_RTOL",
    "SCORE_RTOL",
    "OfficialComparison",
    "compare_with_official",
    "point_ious",
    "score_tolerance",
]

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


@dataclass(eq=False)
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
    crop_box: tuple[int, ...] | None = None  # XYXY
    multimask: int | None = None
    partner: _Mask | None = None
    faulted: bool = False  # the contract already faults its box, pixels or scores
    box_ranges: dict[bool, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def xyxy(self) -> np.ndarray:
        x, y, w, h = (float(v) for v in self.box)
        return np.array([x, y, x + w, y + h])


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
              np.asarray(o["bbox"]), int(o["area"]), crop_box=_xywh_to_xyxy(o["crop_box"]))
        for i, o in enumerate(official)
    ]  # fmt: skip
    mine = [
        _Mask("ours", i, {"size": size, "counts": ours.rles[i]}, float(ours.iou_preds[i]),
              float(ours.stability[i]), ours.points[i], ours.boxes[i], int(ours.areas[i]),
              multimask=int(ours.multimask[i]))
        for i in range(len(ours))
    ]  # fmt: skip
    logits = OfficialLogits(engine, image)
    stages = _nms_stages(settings, engine.cleans_small_regions_after_nms)
    _check_own_boxes(mine, report)
    _check_own_overlaps(mine, stages, settings, report)
    _pair(theirs, mine)
    for o in theirs:
        if o.partner is not None:
            o.partner.crop_box = o.crop_box
            _check_pair(o, o.partner, logits, report)
    _check_unpaired(theirs, mine, logits, stages, report)
    _check_order(theirs, report)
    return report


def _output_of(m: _Mask, logits: OfficialLogits) -> np.ndarray:
    """(H, W) official logits of ``m``'s point and output."""
    if m.crop_box is None:
        m.crop_box = logits.crop_of(m.point)
    point_logits = logits(m.point, m.crop_box)
    if m.multimask is None:
        m.multimask = logits.closest_output(point_logits, m.rle)
    return point_logits[m.multimask]


def _box_range(m: _Mask, raw: bool, logits: OfficialLogits) -> tuple[np.ndarray, np.ndarray]:
    """Inner and outer box ``m`` can have on the other side; ``raw``: before the cleanup."""
    if raw not in m.box_ranges:
        m.box_ranges[raw] = logits.box_range(_output_of(m, logits), None if raw else m.rle)
    return m.box_ranges[raw]


def _xywh_to_xyxy(box) -> tuple[int, ...]:
    x, y, w, h = (int(v) for v in box)
    return (x, y, x + w, y + h)


def _check_own_boxes(mine: list[_Mask], report: OfficialComparison) -> None:
    """Our boxes (inclusive pixel edges, as the official ``bbox``) and areas are our masks'."""
    for m in mine:
        area = int(mask_utils.area(m.rle))
        box = mask_utils.toBbox(m.rle) - [0, 0, 1, 1] if area else np.zeros(4)
        if not np.array_equal(box, m.box) or area != m.area:
            report.violations.append(f"our mask {m.index}: box or area is not its mask's")
            m.faulted = True


@dataclass(frozen=True)
class _NmsStage:
    """One NMS pass of the official generator."""

    threshold: float
    rank: str  # "iou": box NMS, within a crop; "crop": smaller crops first; "cleanup": any
    raw: bool  # it sees the masks before the small-region cleanup that follows it


def _nms_stages(settings: AmgSettings, cleans_after_nms: bool) -> list[_NmsStage]:
    """The NMS passes that can decide: at 1 NMS keeps every box; crop NMS needs crops."""
    cleanup = cleans_after_nms and settings.min_mask_region_area > 0
    stages = [_NmsStage(settings.box_nms_thresh, "iou", cleanup)]
    if settings.crop_n_layers > 0:
        stages.append(_NmsStage(settings.crop_nms_thresh, "crop", cleanup))
    if cleanup:
        both = max(settings.box_nms_thresh, settings.crop_nms_thresh)
        stages.append(_NmsStage(both, "cleanup", raw=False))
    return [stage for stage in stages if stage.threshold < 1.0]


def _check_own_overlaps(mine, stages, settings: AmgSettings, report) -> None:
    """No two of our masks overlap above the last NMS pass's threshold: it keeps one. (Box
    NMS runs per crop, so with crops only a later pass bounds every pair.)"""
    last = stages[-1] if stages else None
    if not mine or last is None or last.raw or (last.rank == "iou" and settings.crop_n_layers):
        return
    boxes = torch.as_tensor(np.stack([m.xyxy for m in mine]), dtype=torch.float32)
    ious = torch.triu(box_iou(boxes, boxes), diagonal=1).double()
    for i, j in (ious > last.threshold).nonzero().tolist():
        report.violations.append(
            f"our masks {i} and {j} overlap by box IoU {float(ious[i, j]):.3g}, above NMS's "
            f"{last.threshold}: it keeps only one of them"
        )


def _pair(theirs: list[_Mask], mine: list[_Mask]) -> None:
    """Each official mask to ours of the same point (SAM 2's generator keeps points in
    float32): the identical mask, else the closest predicted IoU within tolerance, else a
    mask of IoU >= 0.9 with it.
    """
    points = np.array([m.point for m in mine], float).reshape(-1, 2)

    def free(o: _Mask) -> list[_Mask]:
        same_point = np.abs(points - o.point).max(axis=1) <= 1e-3
        return [m for m, here in zip(mine, same_point) if here and m.partner is None]

    for o in theirs:
        candidates = free(o)
        same = [m for m in candidates if m.rle["counts"] == o.rle["counts"]]
        close = sorted(
            (m for m in candidates if abs(m.iou - o.iou) <= score_tolerance(o.iou)),
            key=lambda m: abs(m.iou - o.iou),
        )
        match = (same or close or [None])[0]
        if match is not None:
            o.partner, match.partner = match, o
    for o in theirs:  # the same mask with a score off: paired, so that the score is checked
        candidates = free(o) if o.partner is None else []
        if candidates:
            ious = mask_utils.iou([m.rle for m in candidates], [o.rle], [0])[:, 0]
            if ious.max() >= 0.9:
                match = candidates[int(ious.argmax())]
                o.partner, match.partner = match, o


def _check_pair(o: _Mask, m: _Mask, logits: OfficialLogits, report: OfficialComparison) -> None:
    before = len(report.violations)
    _compare_pair(o, m, logits, report)
    if len(report.violations) > before:
        o.faulted = m.faulted = True


def _compare_pair(o: _Mask, m: _Mask, logits: OfficialLogits, report) -> None:
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


def _check_unpaired(theirs, mine, logits: OfficialLogits, stages, report) -> None:
    """A mask on one side only must sit near a filter's threshold or have lost an NMS
    decision on the other side that could go either way."""
    for m in theirs + mine:
        if m.partner is not None:
            continue
        other = mine if m.side == "official" else theirs
        if _near_filter(m, logits) or any(_lost_to_nms(m, other, s, logits) for s in stages):
            report.near_ties += 1
        else:
            report.violations.append(
                f"{m.side} mask {m.index} (point {m.point.tolist()}, predicted IoU {m.iou:.6g}, "
                f"stability {m.stability:.6g}) has no counterpart and no near-tie explains it"
            )


def _near_filter(m: _Mask, logits: OfficialLogits) -> bool:
    """Near a filter's threshold; a filter at 0 is off in the official generator."""
    settings = logits.settings
    iou_filter = settings.pred_iou_thresh > 0.0
    if iou_filter and abs(m.iou - settings.pred_iou_thresh) <= score_tolerance(m.iou):
        return True
    if settings.stability_score_thresh <= 0.0:
        return False
    return logits.allows_stability(_output_of(m, logits), settings.stability_score_thresh)


def _lost_to_nms(m: _Mask, other: list[_Mask], stage: _NmsStage, logits) -> bool:
    """Whether ``m``, kept on its side only, can have lost ``stage`` on the other side: a
    mask kept there outranks it (a higher score, or one within tolerance) and overlaps the
    box ``m`` can have there above the threshold, while on ``m``'s side that mask is absent
    (its absence is checked on its own) or overlaps ``m`` at most at the threshold. A score
    tie decides which of two masks NMS keeps, never that both stay, and a mask the contract
    already faults explains nothing. A suppressor that a later pass removed on both sides
    (box NMS, then crop NMS) is seen on neither, and excuses nothing.
    """
    for s in other:
        if s.faulted or not _outranks(s, m, stage, logits):
            continue
        there = _iou_bounds(_nms_box(s, stage, logits), _box_range(m, stage.raw, logits))[1]
        if there <= stage.threshold:
            continue
        mate = s.partner
        if mate is None:
            return True
        here = _iou_bounds(_nms_box(mate, stage, logits), _nms_box(m, stage, logits))[0]
        if here <= stage.threshold:
            return True
    return False


def _outranks(s: _Mask, m: _Mask, stage: _NmsStage, logits: OfficialLogits) -> bool:
    """Whether NMS can take ``s`` before ``m``: box NMS by predicted IoU within a crop, crop
    NMS the smaller crop first, and the cleanup's pass (changed masks last) either way."""
    if stage.rank == "cleanup":
        return True
    crops = [x.crop_box if x.crop_box is not None else logits.crop_of(x.point) for x in (s, m)]
    if stage.rank == "crop":
        return _area(np.asarray(crops[0], float)) <= _area(np.asarray(crops[1], float))
    return crops[0] == crops[1] and s.iou >= m.iou - score_tolerance(m.iou)


def _nms_box(m: _Mask, stage: _NmsStage, logits: OfficialLogits):
    """Inner and outer box of ``m`` when ``stage`` saw it: its own box, or before the cleanup
    the box its logits allow."""
    return _box_range(m, True, logits) if stage.raw else (m.xyxy, m.xyxy)


def _iou_bounds(a, b) -> tuple[float, float]:
    """Lowest and highest box IoU, in float32 as NMS computes it, of boxes lying between
    the inner and the outer box of ``a`` and of ``b``."""
    (a_in, a_out), (b_in, b_out) = a, b
    inter_low, inter_high = _inter(a_in, b_in), _inter(a_out, b_out)
    union_low = _area(a_in) + _area(b_in) - inter_low
    union_high = _area(a_out) + _area(b_out) - inter_high
    return _ratio(inter_low, union_high), _ratio(inter_high, union_low)


def _area(box: np.ndarray) -> float:
    return float(np.clip(box[2:] - box[:2], 0, None).prod())


def _inter(a: np.ndarray, b: np.ndarray) -> float:
    return _area(np.concatenate([np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])]))


def _ratio(inter: float, union: float) -> float:
    return float(np.float32(inter) / np.float32(union)) if union > 0 else 0.0


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
