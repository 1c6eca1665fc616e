"""A batch of point prompts from the decoder's outputs to masks on the host, on the device.

Which multimask outputs go on (:func:`choose`) is decided on the device, with a sync only
where the IoU filter makes their number depend on the data. Their full-resolution logits
are finished in groups (:func:`finish`): stability, binarisation, boxes and the crop-edge
filter run on a whole group at once, and the host receives two copies per group, the
masks' numbers and the kept masks, whatever the number of masks. RLE encoding stays on
the host (pycocotools' C encoder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from usam.sam.amg_settings import AmgSettings
from usam.sam.mask_postprocess import (
    Candidates,
    encode_rles,
    mask_boxes,
    near_crop_edge,
    stability_scores,
)


@dataclass(frozen=True)
class Choice:
    """The multimask outputs chosen from a batch, on the device."""

    points: torch.Tensor  # (p,) ascending rows of the points with a chosen output
    of_point: torch.Tensor  # (k,) each chosen output's index into ``points``
    output: torch.Tensor  # (k,) which multimask output

    @property
    def rows(self) -> torch.Tensor:
        """(k,) each chosen output's point row in the batch."""
        return self.points[self.of_point]


def choose(iou_preds: torch.Tensor, settings: AmgSettings) -> Choice:
    """Which of the (points, outputs) ``iou_preds`` go on, in the official order: each
    point's best with ``one_per_point``, those above ``pred_iou_thresh`` (two syncs, for
    their number), or all of them."""
    n, outputs = iou_preds.shape
    rows = torch.arange(n, device=iou_preds.device)
    if settings.proposals == "one_per_point":
        return Choice(rows, rows, iou_preds.argmax(dim=1))
    if settings.pred_iou_thresh <= 0.0:
        every = torch.arange(outputs, device=rows.device).repeat(n)
        return Choice(rows, rows.repeat_interleave(outputs), every)
    passed = iou_preds > settings.pred_iou_thresh
    with_mask = passed.any(dim=1)
    row, output = passed.nonzero().unbind(1)
    return Choice(with_mask.nonzero().flatten(), (with_mask.cumsum(0) - 1)[row], output)


@dataclass(frozen=True)
class Finished:
    """A group's kept masks on the host: per mask its point's row in the batch,
    ``multimask``, predicted IoU, stability, box (XYXY) and area, and its RLE."""

    numbers: np.ndarray  # (k, 9) float64, which holds every one of them exactly
    rles: list[str]

    def candidates(self, points: np.ndarray, tokens: np.ndarray) -> Candidates:
        """With the batch's ``points`` (x, y) and mask ``tokens``, by row."""
        rows = self.numbers[:, 0].astype(np.int64)
        return Candidates(
            rles=self.rles,
            boxes=torch.as_tensor(self.numbers[:, 4:8].astype(np.int64)),
            areas=torch.as_tensor(self.numbers[:, 8].astype(np.int64)),
            iou_preds=torch.as_tensor(self.numbers[:, 2].astype(np.float32)),
            stability=torch.as_tensor(self.numbers[:, 3].astype(np.float32)),
            points=torch.as_tensor(points[rows]),
            multimask=torch.as_tensor(self.numbers[:, 1].astype(np.int8)),
            tokens=torch.as_tensor(tokens[rows]),
        )


def finish(
    low_res: torch.Tensor,
    upsample: Callable[[torch.Tensor], torch.Tensor],
    numbers: list[torch.Tensor],
    threshold: float,
    settings: AmgSettings,
    crop_box: list[int],
    orig_size: tuple[int, int],
) -> Finished | None:
    """Upsampling, stability, binarisation, boxes and the crop-edge filter of a group of
    ``low_res`` logits on their device; one copy of the numbers to the host, one of the
    kept masks, column major as the RLE encoder reads them. None when no mask is kept.

    ``numbers``: per mask its point's row in the batch, ``multimask`` and predicted IoU.
    """
    s = settings
    logits = upsample(low_res)  # (masks, crop height, crop width)
    stability = stability_scores(logits, threshold, s.stability_score_offset)
    masks = logits > threshold
    del logits  # the group's largest tensor, freed before the masks are copied
    boxes = mask_boxes(masks)
    if s.stability_score_thresh > 0.0:
        keep = stability >= s.stability_score_thresh
    else:  # off, as in the official generator: an empty mask's NaN stability stays
        keep = torch.ones(len(masks), dtype=torch.bool, device=masks.device)
    edge = near_crop_edge(boxes, crop_box, orig_size)
    if edge is not None:
        keep &= ~edge
    columns = [*numbers, stability, *boxes.unbind(1), masks.sum((-2, -1)), keep]
    host = torch.stack([column.double() for column in columns], dim=1).cpu().numpy()
    kept = np.flatnonzero(host[:, -1])
    if not len(kept):
        return None
    column_major = masks.transpose(1, 2)
    if len(kept) < len(masks):
        column_major = column_major.index_select(0, torch.as_tensor(kept, device=masks.device))
    rles = encode_rles(column_major.contiguous().cpu().numpy(), crop_box, orig_size)
    return Finished(host[kept, :-1], rles)
