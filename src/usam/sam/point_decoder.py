"""SAM's mask decoder for a batch of point prompts, reordered within the contract.

The token-side layers see the whole point batch, as in the official decoder; the image
side runs ``chunk`` points at a time with its products folded into the tokens
(``usam.sam.decoder_attention``). Predicted IoU and the mask tokens come from the
transformer alone; the upscaling to low-resolution mask logits (as matrix products,
``usam.sam.mask_upscaling``) runs later, only for the points some mask of which passed
the IoU filter.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything import SamPredictor

from usam.sam.decoder_attention import ImageSides, two_way_transformer
from usam.sam.mask_upscaling import masks_from, upscale


class PointDecoder:
    """The mask decoder of ``predictor``'s model on the image set in ``predictor``.

    ``chunk``: points per pass of the image-side work; one is fastest on CPU, where it
    stays in cache. On a GPU a larger chunk saves kernel launches.
    """

    def __init__(self, predictor: SamPredictor, *, chunk: int) -> None:
        if chunk < 1:
            raise ValueError(f"decoder_chunk must be at least 1, got {chunk}")
        self.predictor = predictor
        self.chunk = chunk
        # the reused image-side state, per device and dtype; the positional encoding is
        # the model's
        self._sides = ImageSides(predictor.model.prompt_encoder.get_dense_pe)

    def decode(self, points: np.ndarray, crop_size) -> DecodedPoints:
        """Transformer outputs for ``points`` (x, y) in the pixels of the image set."""
        decoder = self.predictor.model.mask_decoder
        hs, chunks = self.transformer_outputs(points, crop_size)
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
        )

    def transformer_outputs(
        self, points: np.ndarray, crop_size
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The two-way transformer's token outputs (points, tokens, 256) for ``points`` and
        its final image keys by chunk of points."""
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
            chunk=self.chunk,
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


@dataclass(frozen=True)
class DecodedPoints:
    """The transformer's outputs for a batch of points; mask logits are made on request."""

    iou_preds: torch.Tensor  # (points, 3) float32, the multimask outputs
    tokens: torch.Tensor  # (points, 4 * 256) float32: the 4 mask tokens of each point
    hyper_in: torch.Tensor  # (points, 4, upscaled channels)
    image_keys: list[torch.Tensor]  # the final image keys, by chunk of points
    image_shape: tuple[int, int, int]  # (channels, height, width) of the image embedding
    decoder: PointDecoder

    def low_res_masks(self, point_idx: torch.Tensor) -> torch.Tensor:
        """Low-res logits (len(point_idx), outputs, h', w') of some of the points."""
        starts = np.cumsum([0] + [len(keys) for keys in self.image_keys]).tolist()
        out = [
            self.decoder.mask_logits(self, idx[None], self._keys_of(int(idx), starts)).float()
            for idx in point_idx
        ]  # one point at a time, which stays in cache
        return torch.cat(out)

    def _keys_of(self, point: int, starts: list[int]) -> torch.Tensor:
        chunk = bisect.bisect_right(starts, point) - 1
        offset = point - starts[chunk]
        return self.image_keys[chunk][offset : offset + 1]
