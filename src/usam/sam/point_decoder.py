"""SAM's mask decoder for a batch of point prompts, reordered within the contract.

The token-side layers see the whole point batch, as in the official decoder; the image
side runs a pass of points at a time (``PointGridEngine.points_per_pass``: one on a CPU,
the batch on a GPU) with its products folded into the tokens
(``usam.sam.decoder_attention``). Predicted IoU and the mask tokens come from the
transformer alone; the upscaling to low-resolution mask logits (as matrix products,
``usam.sam.mask_upscaling``) runs later, only for the points some mask of which passed
the IoU filter, in the same passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from segment_anything import SamPredictor

from usam.sam.decoder_attention import ImageSides, two_way_transformer
from usam.sam.mask_upscaling import masks_from, upscale


class PointDecoder:
    """The mask decoder of ``predictor``'s model on the image set in ``predictor``."""

    def __init__(self, predictor: SamPredictor) -> None:
        self.predictor = predictor
        # the reused image-side state, per device and dtype; the positional encoding is
        # the model's
        self._sides = ImageSides(predictor.model.prompt_encoder.get_dense_pe)

    def decode(self, points: np.ndarray, crop_size, *, per_pass: int = 1) -> DecodedPoints:
        """Transformer outputs for ``points`` (x, y) in the pixels of the image set, the
        image side ``per_pass`` points at a time (by default a CPU's one)."""
        decoder = self.predictor.model.mask_decoder
        hs, chunks = self.transformer_outputs(points, crop_size, per_pass)
        iou_preds = decoder.iou_prediction_head(hs[:, 0, :])
        mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
            dim=1,
        )
        return DecodedPoints(
            iou_preds=iou_preds[:, 1:].float(),
            tokens=mask_tokens.flatten(1).float(),
            hyper_in=hyper_in,
            image_keys=chunks,
            image_shape=tuple(self.predictor.features.shape[1:]),
            decoder=self,
            multimask=torch.arange(3, device=hs.device).expand(len(hs), 3),
        )

    def transformer_outputs(
        self, points: np.ndarray, crop_size, per_pass: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The two-way transformer's token outputs (points, tokens, 256) for ``points`` and
        its final image keys by pass of ``per_pass`` points."""
        predictor = self.predictor
        sam = predictor.model
        coords = torch.as_tensor(
            predictor.transform.apply_coords(points, crop_size), device=predictor.device
        )
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        sparse, dense = sam.prompt_encoder(
            points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None
        )
        output_tokens = self.output_tokens()
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), 1)
        return two_way_transformer(
            sam.mask_decoder.transformer,
            tokens,
            predictor.features,
            dense,
            self._sides,
            chunk=per_pass,
        )

    def output_tokens(self) -> torch.Tensor:
        """The decoder's learnt output tokens in its order: the IoU token, the mask tokens."""
        decoder = self.predictor.model.mask_decoder
        return torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)

    def mask_logits(self, decoded: DecodedPoints, idx: torch.Tensor, keys: torch.Tensor):
        """Low-res logits (len(idx), 3, h', w') of the multimask outputs of points ``idx``
        from their final image keys (len(idx), h * w, 256)."""
        upscaled = upscale(self.predictor.model.mask_decoder.output_upscaling, keys)
        return masks_from(upscaled, decoded.hyper_in[idx, 1:], decoded.image_shape[1:])


class MaskLogits(Protocol):
    """A decoder's upscaling: low-res logits of some points from their final image keys."""

    def mask_logits(
        self, decoded: DecodedPoints, idx: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class DecodedPoints:
    """The transformer's outputs for a batch of points; mask logits are made on request."""

    iou_preds: torch.Tensor  # (points, outputs) float32: 3 multimask outputs, HQ-SAM's 1
    tokens: torch.Tensor  # (points, 4 * 256) float32: the 4 mask tokens of each point
    hyper_in: torch.Tensor  # (points, 4, upscaled channels)
    image_keys: list[torch.Tensor]  # the final image keys, by pass of points
    image_shape: tuple[int, int, int]  # (channels, height, width) of the image embedding
    decoder: MaskLogits
    multimask: torch.Tensor  # (points, outputs): what ``ImageMasks.multimask`` records

    def low_res_masks(self, point_idx: torch.Tensor) -> torch.Tensor:
        """Low-res logits (len(point_idx), outputs, h', w') of some of the points
        (ascending), upscaled in the passes they were decoded in: a batch in one pass
        reads nothing on the host, passes of single points stay in a CPU's cache."""
        if len(self.image_keys) == 1:
            keys = self.image_keys[0]
            if len(point_idx) < len(keys):
                keys = keys.index_select(0, point_idx)
            return self.decoder.mask_logits(self, point_idx, keys).float()
        per_pass = len(self.image_keys[0])
        passes = (point_idx // per_pass).cpu().numpy()
        starts = [0, *(np.flatnonzero(np.diff(passes)) + 1).tolist()]
        out = []
        for start, stop in zip(starts, [*starts[1:], len(passes)]):
            first, idx = int(passes[start]) * per_pass, point_idx[start:stop]
            keys = self.image_keys[int(passes[start])]
            if stop - start < len(keys):
                keys = keys.index_select(0, idx - first)
            out.append(self.decoder.mask_logits(self, idx, keys).float())
        return torch.cat(out)
