"""What a wrong mask engine would hand back, made from a right result: masks dropped,
duplicated, reordered, rescored, or grown past an NMS decision. The contract check
(``usam.testing.agreement``) has to name each of them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from usam.sam.mask_engine import ImageMasks
from usam.testing.agreement import score_tolerance

PER_MASK = ("rles", "boxes", "areas", "iou_preds", "stability", "points", "multimask", "tokens")


def reordered(masks: ImageMasks, order: list[int]) -> ImageMasks:
    """``masks`` taken in ``order``: an index left out drops that mask, a repeat duplicates it."""
    fields = {
        name: [masks.rles[i] for i in order] if name == "rles" else getattr(masks, name)[order]
        for name in PER_MASK
    }
    return replace(masks, **fields)


def joined(masks: ImageMasks, other: ImageMasks, i: int) -> ImageMasks:
    """``masks`` with ``other``'s mask ``i`` after them."""
    fields = {
        name: masks.rles + [other.rles[i]]
        if name == "rles"
        else np.concatenate([getattr(masks, name), getattr(other, name)[i : i + 1]])
        for name in PER_MASK
    }
    return replace(masks, **fields)


def rescored(masks: ImageMasks, i: int, score: float) -> ImageMasks:
    """Mask ``i`` with predicted IoU ``score`` (float32, as the engine stores it)."""
    iou_preds = masks.iou_preds.copy()
    iou_preds[i] = score
    return replace(masks, iou_preds=iou_preds)


def decoded(masks: ImageMasks, i: int) -> np.ndarray:
    return mask_utils.decode({"size": [masks.height, masks.width], "counts": masks.rles[i]})


def with_mask(masks: ImageMasks, i: int, mask: np.ndarray) -> ImageMasks:
    """Mask ``i`` replaced by ``mask``, with the box and area that mask has."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    changed = replace(masks, rles=list(masks.rles), boxes=masks.boxes.copy(),
                      areas=masks.areas.copy())  # fmt: skip
    changed.rles[i] = rle["counts"].decode("ascii")
    changed.boxes[i] = mask_utils.toBbox(rle) - [0, 0, 1, 1]
    changed.areas[i] = int(mask.sum())
    return changed


def box_ious(masks: ImageMasks) -> np.ndarray:
    """Box IoU of every pair, as NMS computes it (XYXY with inclusive edges, float32)."""
    xyxy = torch.as_tensor(masks.boxes, dtype=torch.float32).clone()
    xyxy[:, 2:] += xyxy[:, :2]
    return box_iou(xyxy, xyxy).numpy()


def edge_moved(mask: np.ndarray, edge: int, pixels: int) -> np.ndarray:
    """``mask`` with one box edge (0 left, 1 top, 2 right, 3 bottom) moved out by ``pixels``
    (the edge's line of pixels repeated) or, for a negative count, in (lines cleared)."""
    view = mask if edge in (0, 2) else mask.T  # columns of ``view`` run along the edge
    view = view if edge in (0, 1) else view[:, ::-1]  # the edge is column ``first``
    moved = view.copy()
    first = int(np.flatnonzero(view.any(0))[0])
    if pixels > 0:
        moved[:, first - pixels : first] = view[:, first : first + 1]
    else:
        moved[:, first : first - pixels] = 0
    moved = moved if edge in (0, 1) else moved[:, ::-1]
    return np.ascontiguousarray(moved if edge in (0, 2) else moved.T)


def grown_past_nms(masks: ImageMasks, threshold: float) -> tuple[int, int, np.ndarray]:
    """``(a, b, mask)``: kept mask ``a`` with one box edge moved by as few pixels as it takes
    (``mask``) overlaps ``b``, which it outranks beyond tolerance, above the NMS threshold:
    NMS would have dropped ``b``."""
    ious, tolerance = box_ious(masks), 10 * score_tolerance(1.0)
    tries = []
    for a, b in zip(*np.nonzero(ious <= threshold)):
        if masks.iou_preds[b] < masks.iou_preds[a] - tolerance and masks.areas[b]:
            tries += [(abs(k), a, b, edge, k) for edge, k in _edge_moves(masks, a)]
    for _, a, b, edge, pixels in sorted(tries):
        if _moved_box_iou(masks, a, b, edge, pixels) <= threshold:
            continue
        mask = edge_moved(decoded(masks, a), edge, pixels)
        if mask.any() and box_ious(with_mask(masks, a, mask))[a, b] > threshold:
            return int(a), int(b), mask
    raise AssertionError("no kept mask overlaps a lower-ranked one above NMS by moving one edge")


def _edge_moves(masks: ImageMasks, i: int) -> list[tuple[int, int]]:
    """Every (edge, pixels) move of mask ``i``'s box edges that stays in the image."""
    x0, y0, w, h = (int(v) for v in masks.boxes[i])
    room = [x0, y0, masks.width - 1 - (x0 + w), masks.height - 1 - (y0 + h)]
    span = [w, h, w, h]
    return [(edge, k) for edge in range(4) for k in range(-span[edge], room[edge] + 1) if k]


def _moved_box_iou(masks: ImageMasks, a: int, b: int, edge: int, pixels: int) -> float:
    """Box IoU of ``b`` with ``a``'s box, that edge moved out by ``pixels`` (in if negative)."""
    boxes = masks.boxes[[a, b]].astype(np.float32).copy()
    boxes[:, 2:] += boxes[:, :2]
    boxes[0, edge] += -pixels if edge < 2 else pixels
    xyxy = torch.as_tensor(boxes)
    return float(box_iou(xyxy[:1], xyxy[1:])[0, 0])
