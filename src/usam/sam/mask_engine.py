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
  ``pred_iou_thresh`` or ``stability_score_thresh``, and those that lost an NMS pass on
  one side only: a mask kept there outranks them (within ``SCORE_RTOL``) and overlaps a
  box their near-threshold pixels allow above the threshold, while on their side it is
  absent or overlaps at most at it. No two kept masks overlap above the last threshold.
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

The work is laid out for the device (``amg.tuned_for``; ``auto`` reads the model's),
within the contract either way. Laid out for a GPU, each batch of ``points_per_batch``
points (the official key and default, 64) passes the decoder's image side and its
upscaling at once, and its masks are chosen, upsampled, scored, binarised, boxed and
filtered on the device in groups of at most ``PIXEL_BUDGETS`` full-resolution pixels
(``usam.sam.mask_batches``): the host gets a fixed number of copies per group (their
numbers, the kept masks) and per batch (the tokens), none per mask, and encodes the RLEs.
Laid out for a CPU, the default there, the image side runs one point per pass, where a
point's 4096 x 256 image keys stay in cache, and the ViT encoder in cache-sized pieces
(``usam.sam.image_encoder``); groups are smaller, larger ones only costing page faults.
That is the faster layout on a CPU: on this project's 2-core CPU, one thread, a VOC photo
at 16 x 16 points, one mask per point, vit_b (random weights) takes 14.0 s of CPU time
against 24.4 s laid out for a GPU (every mask kept: 16.4 s against 27.7 s), the tiny SAM
1.11 s against 1.54 s (the best of runs alternating the two).
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
from usam.sam.mask_batches import choose, finish
from usam.sam.mask_postprocess import Candidates, clean_small_regions, empty_candidates

# Full-resolution mask pixels finished at once, by ``PointGridEngine.tuning``, each mask
# counted at the larger of the image and what upsampling passes through: about 10 bytes a
# pixel. A CPU: two 1024 x 1024 masks; a GPU: a 48 MP photo's masks 5 at a time, in ~3 GB.
PIXEL_BUDGETS = {"cpu": 1 << 21, "gpu": 1 << 28}


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
        # Full-resolution mask pixels finished at once; None: PIXEL_BUDGETS[self.tuning].
        self.pixel_budget: int | None = None
        self.point_grids = build_all_layer_point_grids(
            s.points_per_side, s.crop_n_layers, s.crop_n_points_downscale_factor
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tuning(self) -> str:
        """``cpu`` or ``gpu``: ``amg.tuned_for``, ``auto`` read off the model's device."""
        if self.settings.tuned_for != "auto":
            return self.settings.tuned_for
        return "cpu" if self.device.type == "cpu" else "gpu"

    @property
    def points_per_pass(self) -> int:
        """Points whose decoder image side and upscaling run together: one on a CPU, where
        a point's image keys stay in cache, the whole batch on a GPU."""
        return 1 if self.tuning == "cpu" else self.settings.points_per_batch

    @property
    def budget(self) -> int:
        return self.pixel_budget or PIXEL_BUDGETS[self.tuning]

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

    def upsampling_pixels(self, crop_size: tuple[int, int]) -> int:
        """Pixels per mask of the largest tensor ``upsample`` makes: the crop's, unless a
        backend's upsampling passes through a larger size."""
        return crop_size[0] * crop_size[1]

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
            parts.extend(self._process_batch(batch))
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

    def _process_batch(self, batch: _Batch) -> list[Candidates]:
        """The IoU filter (or each point's best output), upscaling for the points with a
        chosen mask, then the rest in groups of at most ``budget`` full-resolution pixels,
        all on the device (``usam.sam.mask_batches``); the host gets each group's numbers
        and kept masks, and the batch's tokens."""
        decoded = batch.decoded
        choice = choose(decoded.iou_preds, self.settings)
        if not len(choice.output):
            return []
        with self._clock("decoder"), self._precision():
            low_res = decoded.low_res_masks(choice.points)[choice.of_point, choice.output]
        rows = choice.rows
        numbers = [
            rows,
            decoded.multimask[rows, choice.output],
            decoded.iou_preds[rows, choice.output],
        ]
        tokens = decoded.tokens.cpu().numpy()
        x0, y0, x1, y1 = batch.crop_box
        height, width = batch.orig_size  # a crop's masks go into the image on the host
        per_mask = max(self.upsampling_pixels((y1 - y0, x1 - x0)), height * width)
        group = max(1, self.budget // per_mask)
        parts = []
        for i in range(0, len(low_res), group):
            part = slice(i, i + group)
            found = finish(
                low_res[part],
                self.upsample,
                [n[part] for n in numbers],
                self.mask_threshold,
                self.settings,
                batch.crop_box,
                batch.orig_size,
            )
            if found is not None:
                parts.append(found.candidates(batch.points, tokens))
        return parts


class DecodedBatch(Protocol):
    """What a backend's decoder gives for a batch of point prompts."""

    iou_preds: torch.Tensor  # (points, multimask outputs) float32
    tokens: torch.Tensor  # (points, token_dim) float32: the mask tokens of each point
    multimask: torch.Tensor  # (points, multimask outputs) int: ``ImageMasks.multimask``

    def low_res_masks(self, point_idx: torch.Tensor) -> torch.Tensor:
        """(len(point_idx), multimask outputs, h', w') low-res logits of some points."""
        ...
