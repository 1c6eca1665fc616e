"""SAM 1's engine (vit_h/l/b, MobileSAM's vit_t, the tiny test SAM).

Exact mode (the default) gives the official computation's products the official layouts
so that the BLAS picks the same kernels: on a 2-core AMD EPYC with MKL (and on the Intel
CPUs with AMX this was first measured on) the output is bit-identical, all 768 masks and
scores of vit_b at 16 x 16 points. The contract of ``usam.sam.mask_engine`` leaves a
wide margin over what rounding did on the EPYC while a lone point's attention products
still took other kernels than the official batch's: vit_b with
seeded random weights on a VOC photo (16 x 16 points, box NMS off) gave 764 of 768
masks bit-identical, 14 pixels different (all within the logit tolerance) and predicted
IoUs at most 9.3e-8 apart, 100x inside the bound; a pixel flipped far from the
threshold, or a score off by 1e-3, breaks the contract.

The mask tokens are the two-way transformer's output ``hs[:, 1:5]``.

Where the time goes and what is done about it, without changing the computation:

* The image encoder computes its attention in cache-sized pieces
  (``usam.sam.image_encoder``): about 3x faster than the official one on an Intel CPU,
  1.5-2.6x on the 2-core AMD EPYC, where others' memory traffic slows the official one.
* The mask decoder's image-side work (4096 x 256 values per point for the 1024-pixel
  models) is memory-bound; it runs one point at a time so that it stays in cache, while
  the token-side layers see the whole point batch; a point's per-head attention views
  are copied as a batch's are, which keeps the batch's kernels (``usam.sam.point_decoder``,
  ``usam.sam.decoder_attention``).

The small-region cleanup after NMS comes from ``segment_anything`` itself.

``AmgSettings(approximate=True)`` trades exactness for speed; the masks and scores then
only agree with the official ones closely (``benchmarks/extract_speed.py --approximate``
measures how closely):

* Attention over per-point image keys folds the projections into the few token-side
  vectors, e.g. ``softmax(q (X Wk)^T) (X Wv) = (softmax((q Wk) X^T) X) Wv``, which is
  about half the multiply-adds; the softmax over the 7 tokens runs along rows of 4096.
* Stability is scored on the 256 x 256 low-resolution logits, so masks that fail the
  stability filter are never upsampled; the kept masks carry that score.
* The upscaling's LayerNorm2d runs as one channels-last ``layer_norm``.
* On CUDA the decoder runs under bf16 autocast (not yet measured on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam

from usam.sam.amg_settings import AmgSettings
from usam.sam.image_encoder import EncoderPredictor
from usam.sam.mask_engine import DecodedBatch, PointGridEngine
from usam.sam.mask_postprocess import stability_scores
from usam.sam.point_decoder import PointDecoder


class AutomaticMaskEngine(PointGridEngine):
    """SAM 1 (vit_h/l/b, MobileSAM, the tiny test SAM): the official generator's
    computation, with the piecewise encoder and the per-point decoder.

    ``decoder_chunk``: points per pass of the decoder's image-side work
    (``usam.sam.point_decoder.PointDecoder``).
    """

    def __init__(self, sam: Sam, settings: AmgSettings | None = None, *, decoder_chunk: int = 1):
        super().__init__(sam, settings)
        self.predictor = EncoderPredictor(sam)
        self.decoder = PointDecoder(
            self.predictor, chunk=decoder_chunk, approximate=self.settings.approximate
        )

    @property
    def token_dim(self) -> int:
        decoder = self.model.mask_decoder
        return decoder.num_mask_tokens * decoder.transformer_dim

    @property
    def mask_threshold(self) -> float:
        return self.model.mask_threshold

    def official_generator(self) -> Callable[[np.ndarray], list[dict[str, Any]]]:
        generator = SamAutomaticMaskGenerator(
            self.model, output_mode="coco_rle", **self.settings.as_kwargs()
        )
        return generator.generate

    def official_predictor(self) -> SamPredictor:
        return SamPredictor(self.model)

    def set_image(self, crop: np.ndarray) -> None:
        self.predictor.set_image(crop)

    def reset_image(self) -> None:
        self.predictor.reset_image()

    def decode(self, points: np.ndarray, crop_size: tuple[int, int]) -> DecodedBatch:
        return self.decoder.decode(points, crop_size)

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        predictor = self.predictor
        return self.model.postprocess_masks(
            low_res[:, None], predictor.input_size, predictor.original_size
        )[:, 0]

    def low_res_stability(self, low_res: torch.Tensor) -> torch.Tensor:
        """Stability scores of low-res logits, over the part of them that covers the image."""
        scale = low_res.shape[-1] / self.predictor.transform.target_length
        h, w = (math.ceil(side * scale) for side in self.predictor.input_size)
        return stability_scores(
            low_res[:, :h, :w], self.mask_threshold, self.settings.stability_score_offset
        )
