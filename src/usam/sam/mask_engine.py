"""Automatic mask generation over a point grid, with tokens, for every backend.

usam's engines run the computation of each backend's official automatic mask generator
(``segment_anything.SamAutomaticMaskGenerator`` for SAM 1,
``sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator`` for SAM 2.1) with the same
weights and settings, faster. :class:`PointGridEngine` holds the flow they share; a
backend module (``usam.sam.sam1_backend``, ``usam.sam.sam2_backend``) supplies the model's
encoder and decoder. Kernels, and so rounding, change with the CPU, the thread count (the
official output changes with it too), ATen's and oneDNN's instruction sets and the
device. What holds on every one of them, with ``amg.precision: fp32`` (bf16 is outside it),
is this contract, checked by ``usam.testing.agreement.compare_with_official``, which pairs
each official mask with ours of the same point prompt:

* Masks are equal except at pixels whose official logit lies within ``LOGIT_RTOL``
  (1e-4) x max(1, largest |logit| of that multimask output) of the mask threshold (0.0).
* Predicted IoUs differ by at most ``SCORE_RTOL`` (1e-5) x max(1, |official|).
* Stability scores are equal except through pixels whose logit lies within that logit
  tolerance of threshold +- offset: the score stays in the range those pixels allow.
* Boxes and areas are those of the masks; points are equal.
* Keep/drop decisions are the same, except for candidates within those tolerances of
  ``pred_iou_thresh`` or ``stability_score_thresh``, candidates whose box IoU with
  another can cross an NMS threshold when box edges move by one pixel or whose NMS
  score is tied with it within ``SCORE_RTOL``, and candidates suppressed by, or
  suppressing, a mask so explained.
* The order is the same except among masks whose predicted IoUs lie within
  ``SCORE_RTOL`` of each other.
* With ``proposals: one_per_point`` the reference is the official generator with its
  filters off, keeping each point's output of highest predicted IoU
  (:meth:`PointGridEngine.reference_masks`); the chosen output is the same except for
  points whose outputs' predicted IoUs lie within ``SCORE_RTOL`` of each other.

Each mask also carries the four mask tokens of its point prompt (the two-way
transformer's outputs for the mask tokens, before the hypernetwork MLPs) flattened to
1024 values, which is what U-SAM classifies.

Predicted IoU comes from the transformer alone, so the IoU filter runs first: mask
upscaling inside the decoder and the upsampling to image size are done only for the
masks that pass it. Stability is still computed on the full-resolution logits, as the
official code does. Masks are encoded with pycocotools' C RLE encoder
(``usam.sam.mask_postprocess``). Point grids and crop boxes come from
``segment_anything`` itself, so the geometry cannot drift from the official generators.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from segment_anything.utils.amg import build_all_layer_point_grids, generate_crop_boxes
from torchvision.ops.boxes import batched_nms, box_area

from usam.formats.embedding_shards import ImageRecord
from usam.sam.amg_settings import AmgSettings, AmgSettingsError
from usam.sam.mask_postprocess import (
    Candidates,
    clean_small_regions,
    empty_candidates,
    encode_rles,
    mask_boxes,
    near_crop_edge,
    stability_scores,
)

_UPSAMPLE_CHUNK = 2  # full-resolution masks held at once (under glibc's mmap threshold)


@dataclass
class ImageMasks:
    """The kept masks of one image, in the official generator's order."""

    height: int
    width: int
    rles: list[str]  # COCO compressed RLE counts; size is (height, width)
    boxes: np.ndarray  # (N, 4) int64 XYWH, as the official ``bbox``
    areas: np.ndarray  # (N,) int64
    iou_preds: np.ndarray  # (N,) float32
    stability: np.ndarray  # (N,) float32
    points: np.ndarray  # (N, 2) float64 (x, y) in image pixels
    multimask: np.ndarray  # (N,) int8: which multimask output (0..2); token index is +1
    tokens: np.ndarray  # (N, 1024) float32: the 4 mask tokens of the mask's point

    def __len__(self) -> int:
        return len(self.rles)

    def to_record(
        self,
        key: str,
        *,
        labels: list[int] | None = None,
        ground_truth: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
    ) -> ImageRecord:
        return ImageRecord(
            key=key,
            height=self.height,
            width=self.width,
            embeddings=self.tokens.astype(np.float16),
            iou_preds=self.iou_preds.astype(np.float32),
            stability=self.stability.astype(np.float32),
            boxes=self.boxes.astype(np.float32),
            points=self.points.astype(np.float32),
            multimask=self.multimask.astype(np.int8),
            rles=list(self.rles),
            labels=labels,
            ground_truth=ground_truth,
            source=dict(source or {}),
        )


@dataclass(frozen=True)
class _Batch:
    """One batch of point prompts of one crop, as the post-processing needs it."""

    decoded: DecodedBatch
    points: np.ndarray  # (points, 2) (x, y) in crop pixels
    crop_box: list[int]  # XYXY in image pixels
    orig_size: tuple[int, int]  # (height, width) of the image

    @property
    def flat_iou(self) -> torch.Tensor:
        return self.decoded.iou_preds.flatten()


class PointGridEngine(ABC):
    """The automatic mask generator's flow over a point grid, shared by every backend.

    A backend (one family of mask-proposal models) subclasses it with how to embed a
    crop (``set_image``), decode a batch of point prompts (``decode``: predicted IoUs
    and mask tokens for all, low-res logits on request), upsample low-res logits to the
    crop (``upsample``), and what its official generator is, for the agreement checks
    (``official_generator``, ``official_point_logits``). The crops, the IoU filter before
    any upsampling, the stability and crop-edge filters, NMS and the shard layout are
    this class's, so every backend's masks land in the same ``ImageMasks``.
    """

    # whether the official generator removes small regions after NMS (SAM 1) rather than
    # inside its predictor (SAM 2)
    cleans_small_regions_after_nms = True
    # whether the backend has HQ-SAM's output choices (amg.hq_token_only, amg.multimask_output)
    has_hq_outputs = False

    def __init__(self, model: torch.nn.Module, settings: AmgSettings | None = None) -> None:
        self.model = model.eval()
        self.settings = settings or AmgSettings()
        s = self.settings
        if not self.has_hq_outputs and (s.hq_token_only or not s.multimask_output):
            raise AmgSettingsError(
                f"amg.hq_token_only={s.hq_token_only} and amg.multimask_output="
                f"{s.multimask_output} choose HQ-SAM's outputs (sam=hq_*); "
                f"{type(self).__name__} has none: keep false and true"
            )
        # Wall seconds of the last ``generate`` by stage: encoder, decoder (the mask
        # decoder and its upscaling), post-processing (the rest).
        self.stage_seconds: dict[str, float] = {}
        s = self.settings
        self.point_grids = build_all_layer_point_grids(
            s.points_per_side, s.crop_n_layers, s.crop_n_points_downscale_factor
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    @abstractmethod
    def token_dim(self) -> int:
        """Values per mask embedding: the decoder's mask tokens of a point, flattened."""
        ...

    @property
    @abstractmethod
    def mask_threshold(self) -> float: ...

    @abstractmethod
    def official_generator(self) -> Callable[[np.ndarray], list[dict[str, Any]]]:
        """The backend's own automatic mask generator with these settings, COCO RLE output."""
        ...

    @abstractmethod
    def official_predictor(self) -> Any:
        """The backend's own predictor (``set_image``, ``predict``) with these settings."""
        ...

    def reference_masks(self, image: np.ndarray) -> list[dict[str, Any]]:
        """What exact mode reproduces: the official generator's records with these settings,
        and with ``one_per_point`` each point's record of highest predicted IoU (its filters
        are off then, so every point has all its outputs there), in the official order."""
        records = self.official_generator()(image)
        if self.settings.proposals == "filtered":
            return records
        best: dict[tuple[float, ...], dict[str, Any]] = {}
        for record in records:
            point = tuple(np.ravel(record["point_coords"]).tolist())
            if point not in best or record["predicted_iou"] > best[point]["predicted_iou"]:
                best[point] = record
        chosen = {id(record) for record in best.values()}
        return [record for record in records if id(record) in chosen]

    def official_point_logits(self, crop: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """The official predictor on ``crop``: (3, h, w) multimask logits of one point alone."""
        predictor = self.official_predictor()
        predictor.set_image(crop)

        def logits(point: np.ndarray) -> np.ndarray:
            out, _, _ = predictor.predict(
                point[None], np.array([1]), multimask_output=True, return_logits=True
            )
            return out

        return logits

    @abstractmethod
    def set_image(self, crop: np.ndarray) -> None: ...

    @abstractmethod
    def reset_image(self) -> None: ...

    @abstractmethod
    def decode(self, points: np.ndarray, crop_size: tuple[int, int]) -> DecodedBatch: ...

    @abstractmethod
    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """(n, H, W) logits at the crop's size from (n, h', w') low-res logits."""
        ...

    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> ImageMasks:
        """Masks of an HWC uint8 RGB image."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}"
            )
        start = time.perf_counter()
        self.stage_seconds = {"encoder": 0.0, "decoder": 0.0}
        s = self.settings
        height, width = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            (height, width), s.crop_n_layers, s.crop_overlap_ratio
        )
        parts = [
            self._process_crop(image, box, layer) for box, layer in zip(crop_boxes, layer_idxs)
        ]
        data = Candidates.cat(parts)
        if len(crop_boxes) > 1:
            crop_of_mask = [box for box, part in zip(crop_boxes, parts) for _ in part.rles]
            scores = 1 / box_area(torch.tensor(crop_of_mask, dtype=torch.int64).reshape(-1, 4))
            keep = batched_nms(
                data.boxes.float(), scores, torch.zeros(len(data.rles)), s.crop_nms_thresh
            )
            data = data.select(keep)
        if s.min_mask_region_area > 0 and self.cleans_small_regions_after_nms:
            data = clean_small_regions(data, height, width, s)
        xywh = data.boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        elapsed = time.perf_counter() - start
        self.stage_seconds["post-processing"] = elapsed - sum(self.stage_seconds.values())
        return ImageMasks(
            height=height,
            width=width,
            rles=data.rles,
            boxes=xywh.numpy(),
            areas=data.areas.numpy(),
            iou_preds=data.iou_preds.numpy(),
            stability=data.stability.numpy(),
            points=data.points.numpy(),
            multimask=data.multimask.numpy(),
            tokens=data.tokens.float().numpy(),
        )

    @contextmanager
    def _clock(self, stage: str):
        """Adds the wall time of the block to ``stage_seconds[stage]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.stage_seconds[stage] += time.perf_counter() - start

    def _precision(self):
        """The encoder and decoder under ``amg.precision``: bf16 autocast, or for fp32 autocast
        off, so that exact mode holds inside a caller's autocast too. Read per call: an
        engine whose settings change between images switches (the caches are keyed by it).
        """
        bf16 = self.settings.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _process_crop(self, image, crop_box, layer_idx) -> Candidates:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        with self._clock("encoder"), self._precision():
            self.set_image(crop)
        points = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
        step = self.settings.points_per_batch
        parts = []
        for i in range(0, len(points), step):
            with self._clock("decoder"), self._precision():
                decoded = self.decode(points[i : i + step], crop_size)
            batch = _Batch(decoded, points[i : i + step], crop_box, image.shape[:2])
            parts.append(self._process_batch(batch))
        self.reset_image()
        data = Candidates.cat([empty_candidates(self.token_dim), *parts])
        keep = batched_nms(
            data.boxes.float(),
            data.iou_preds,
            torch.zeros(len(data.rles)),
            iou_threshold=self.settings.box_nms_thresh,
        )
        data = data.select(keep)
        data.boxes = data.boxes + torch.tensor([[x0, y0, x0, y0]])
        data.points = data.points + torch.tensor([[x0, y0]])
        return data

    def _process_batch(self, batch: _Batch) -> Candidates:
        """IoU filter (or each point's best output), then upscaling, upsampling and the
        remaining filters of the survivors."""
        s = self.settings
        flat_iou = batch.flat_iou
        n_out = batch.decoded.iou_preds.shape[1]
        if s.proposals == "one_per_point":  # each point's best output; filters are off
            best = batch.decoded.iou_preds.argmax(dim=1)
            keep = torch.arange(len(best), device=best.device) * n_out + best
        elif s.pred_iou_thresh > 0.0:
            keep = (flat_iou > s.pred_iou_thresh).nonzero().flatten()
        else:
            keep = torch.arange(flat_iou.numel(), device=flat_iou.device)
        parts = [empty_candidates(self.token_dim)]
        if not len(keep):
            return parts[0]
        point_idx, inverse = torch.unique(keep // n_out, return_inverse=True)
        with self._clock("decoder"), self._precision():
            low_res = batch.decoded.low_res_masks(point_idx)[inverse, keep % n_out]
        for i in range(0, len(keep), _UPSAMPLE_CHUNK):
            part = slice(i, i + _UPSAMPLE_CHUNK)
            parts.append(self._finish_masks(batch, low_res[part], keep[part]))
        return Candidates.cat(parts)

    def _finish_masks(self, batch: _Batch, low_res: torch.Tensor, sel: torch.Tensor) -> Candidates:
        """Upsample, stability filter, binarise, box, crop-edge filter, RLE: survivors only.

        ``sel``: the masks' indices into the batch's flattened multimask outputs.
        """
        s = self.settings
        logits = self.upsample(low_res)
        threshold = self.mask_threshold
        keep = torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        stability = stability_scores(logits, threshold, s.stability_score_offset)
        if s.stability_score_thresh > 0.0:
            keep = stability >= s.stability_score_thresh
        masks = logits[keep] > threshold
        boxes = mask_boxes(masks)
        edge = near_crop_edge(boxes, batch.crop_box, batch.orig_size)
        if edge is not None:
            keep[keep.clone()] = ~edge
            masks, boxes = masks[~edge], boxes[~edge]
        sel, stability = sel[keep], stability[keep]
        n_out = batch.decoded.iou_preds.shape[1]
        point_of = (sel // n_out).cpu()
        tokens = batch.decoded.tokens
        return Candidates(
            rles=encode_rles(masks, batch.crop_box, batch.orig_size),
            boxes=boxes.cpu(),
            areas=masks.sum((-2, -1)).cpu(),
            iou_preds=batch.flat_iou[sel].cpu(),
            stability=stability.cpu(),
            points=torch.as_tensor(batch.points)[point_of],
            multimask=(sel % n_out).to(torch.int8).cpu(),
            tokens=tokens[point_of.to(tokens.device)].cpu(),
        )


class DecodedBatch(Protocol):
    """What a backend's decoder gives for a batch of point prompts."""

    iou_preds: torch.Tensor  # (points, multimask outputs) float32
    tokens: torch.Tensor  # (points, token_dim) float32: the mask tokens of each point

    def low_res_masks(self, point_idx: torch.Tensor) -> torch.Tensor:
        """(len(point_idx), multimask outputs, h', w') low-res logits of some points."""
        ...
