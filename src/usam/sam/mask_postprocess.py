"""Post-processing of decoded masks as the official generator does it, on whole batches.

Masks are encoded with pycocotools' C RLE encoder instead of Python-level torch code,
and nothing is deep-copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import remove_small_regions
from torchvision.ops.boxes import batched_nms

from usam.sam.amg_settings import AmgSettings

_EDGE_TOLERANCE = 20.0  # pixels, as in the official crop-edge filter


@dataclass
class Candidates:
    """Masks of one crop that passed the per-batch filters (crop frame, not yet deduplicated)."""

    rles: list[str]
    boxes: torch.Tensor  # (N, 4) int64 XYXY in the crop frame
    areas: torch.Tensor
    iou_preds: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor  # float64, crop frame
    multimask: torch.Tensor
    tokens: torch.Tensor

    @staticmethod
    def cat(parts: list[Candidates]) -> Candidates:
        fields = {}
        for name in Candidates.__dataclass_fields__:
            values = [getattr(p, name) for p in parts]
            fields[name] = sum(values, []) if name == "rles" else torch.cat(values)
        return Candidates(**fields)

    def select(self, keep: torch.Tensor) -> Candidates:
        keep = keep.cpu()
        if keep.dtype == torch.bool:
            keep = keep.nonzero().flatten()
        fields = {
            name: [value[i] for i in keep.tolist()] if name == "rles" else value[keep]
            for name, value in vars(self).items()
        }
        return Candidates(**fields)


def empty_candidates(token_dim: int) -> Candidates:
    return Candidates(
        rles=[],
        boxes=torch.zeros(0, 4, dtype=torch.int64),
        areas=torch.zeros(0, dtype=torch.int64),
        iou_preds=torch.zeros(0),
        stability=torch.zeros(0),
        points=torch.zeros(0, 2, dtype=torch.float64),
        multimask=torch.zeros(0, dtype=torch.int8),
        tokens=torch.zeros(0, token_dim),
    )


def clean_small_regions(
    data: Candidates, height: int, width: int, settings: AmgSettings
) -> Candidates:
    """The official cleanup: fill small holes, drop small islands, re-run box NMS."""
    s = settings
    if not data.rles:
        return data
    masks, scores = [], []
    for counts in data.rles:
        rle = {"size": [height, width], "counts": counts}
        mask = np.ascontiguousarray(mask_utils.decode(rle), dtype=bool)
        mask, filled = remove_small_regions(mask, s.min_mask_region_area, mode="holes")
        mask, dropped = remove_small_regions(mask, s.min_mask_region_area, mode="islands")
        masks.append(torch.as_tensor(mask))
        scores.append(float(not (filled or dropped)))
    stacked = torch.stack(masks)
    boxes = mask_boxes(stacked)
    keep = batched_nms(
        boxes.float(),
        torch.as_tensor(scores),
        torch.zeros(len(boxes)),
        iou_threshold=max(s.box_nms_thresh, s.crop_nms_thresh),
    )
    for i in keep.tolist():
        if scores[i] == 0.0:
            whole = [0, 0, width, height]
            column_major = stacked[i : i + 1].transpose(1, 2).contiguous().numpy()
            data.rles[i] = encode_rles(column_major, whole, (height, width))[0]
            data.boxes[i] = boxes[i]
            data.areas[i] = stacked[i].sum()
    return data.select(keep)


def stability_scores(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """The official stability score: area above ``threshold + offset`` over area above
    ``threshold - offset``, per mask.
    """
    inter = (logits > threshold + offset).sum((-2, -1), dtype=torch.int32)
    union = (logits > threshold - offset).sum((-2, -1), dtype=torch.int32)
    return inter / union


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (inclusive pixel edges, int64) of binary masks; zeros for empty masks."""
    n, h, w = masks.shape
    rows = masks.any(dim=2).to(torch.uint8)
    cols = masks.any(dim=1).to(torch.uint8)
    top = rows.argmax(dim=1)
    bottom = h - 1 - rows.flip(1).argmax(dim=1)
    left = cols.argmax(dim=1)
    right = w - 1 - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    return boxes * rows.any(dim=1, keepdim=True)


def near_crop_edge(boxes, crop_box, orig_size) -> torch.Tensor | None:
    """Masks touching a crop border that is not an image border; None for the full image."""
    orig_h, orig_w = orig_size
    if list(crop_box) == [0, 0, orig_w, orig_h]:
        return None
    x0, y0 = crop_box[:2]
    crop = torch.tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.tensor([0, 0, orig_w, orig_h], dtype=torch.float, device=boxes.device)
    shifted = (boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)).float()
    near_crop = (shifted - crop).abs() <= _EDGE_TOLERANCE
    near_image = (shifted - image).abs() <= _EDGE_TOLERANCE
    return (near_crop & ~near_image).any(dim=1)


def encode_rles(column_major: np.ndarray, crop_box, orig_size) -> list[str]:
    """COCO RLE counts of binary masks given as (N, W, H), each mask's columns in a row
    (Fortran order, what pycocotools reads), placed into the full image when they come
    from a crop."""
    if len(column_major) == 0:
        return []
    if list(crop_box) != [0, 0, orig_size[1], orig_size[0]]:
        x0, y0, x1, y1 = crop_box
        full = np.zeros((len(column_major), orig_size[1], orig_size[0]), dtype=bool)
        full[:, x0:x1, y0:y1] = column_major
        column_major = full
    # (N, W, H) C-order is (H, W, N) Fortran order, without a copy.
    fortran = column_major.view(np.uint8).transpose(2, 1, 0)
    return [rle["counts"].decode("ascii") for rle in mask_utils.encode(fortran)]
