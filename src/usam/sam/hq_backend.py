"""HQ-SAM (arXiv 2306.01567) as a mask-proposal backend: sharper mask boundaries.

HQ-SAM keeps SAM 1's encoder and decoder frozen and adds an HQ output token, with its
own MLP, whose mask is made from HQ features: the decoder's upscaled embedding, refined,
plus a fusion of the image embedding (early) and the first global-attention block's
output (late) of the encoder. The models are ``segment_anything_hq`` (``pip install
'usam[hq]'``); its automatic generator, ``segment_anything_hq.SamAutomaticMaskGenerator``,
is SAM 1's with one mask per point: with ``multimask_output`` (its default) the best
of SAM's three multimask outputs, by predicted IoU, plus the HQ token's mask; without it
SAM's single-mask output plus the HQ mask; with ``hq_token_only`` the HQ mask alone
(its predictor's default, which the generator keeps, is off). The score is SAM's
predicted IoU of the output chosen.

:class:`HqMaskEngine` runs that computation under the exactness contract of
``usam.sam.mask_engine`` with SAM 1's point decoder (``usam.sam.point_decoder``):
the HQ token rides along in the two-way transformer, and the HQ fusion is added to the
shared upscaling only for the points some mask of which passed the IoU filter.

What the shards hold: the same 4 x 256 values per point as SAM 1, with the HQ token in
slot 0, where SAM 1 keeps its single-mask token (whose mask HQ-SAM's default output does
not use), then SAM's three multimask tokens. ``multimask`` names the SAM output the mask
is built on (0..2, its token in slot ``multimask + 1``), or is -1 when the mask's own
token is the HQ token (``hq_token_only``; without ``multimask_output``, where SAM's
single-mask token is not stored). Every ``model.input_view`` thus covers the HQ token:
``mask_token`` reads it for HQ-only masks, ``tokens`` and ``own_first`` always.

HQ-SAM publishes no checksums, so its downloads are not verified (as SAM 2.1's).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from usam.core.errors import UsageError
from usam.formats.embedding_shards import TOKENS_PER_POINT
from usam.sam.amg_settings import AmgSettings
from usam.sam.backend_spec import EncoderShape, SamSpec
from usam.sam.image_encoder import EncoderPredictor, encode_vit
from usam.sam.mask_upscaling import to_image_order, upscale
from usam.sam.point_decoder import DecodedPoints, PointDecoder
from usam.sam.sam1_backend import (
    AutomaticMaskEngine,
    image_encoder_shape,
    tiny_vit_encoder,
    with_sam_heads,
)

MISSING = (
    "sam={model_type} needs HQ-SAM's package: pip install 'usam[hq]' "
    "(segment-anything-hq==0.3 and timm), or choose a SAM 1 model (sam=vit_b, vit_l, vit_h)"
)
URL_BASE = "https://huggingface.co/lkeab/hq-sam/resolve/main/"


class HqSamMissing(UsageError, ImportError):
    """The optional ``segment_anything_hq`` package (or timm, which it imports) is missing."""


def _package(model_type: str = "hq_tiny") -> Any:
    """``segment_anything_hq``, imported when asked for; its import of timm's renamed
    modules and its TinyViT registration warn, which is silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import segment_anything_hq
    except ImportError as error:
        raise HqSamMissing(f"{MISSING.format(model_type=model_type)} ({error})") from error
    return segment_anything_hq


def require(model_type: str) -> None:
    _package(model_type)


class HqEncoderPredictor(EncoderPredictor):
    """The image embedding, and the HQ features the decoder's HQ token reads, per image.

    A ViT encoder runs in pieces while ``in_pieces`` (``usam.sam.image_encoder``), the
    TinyViT as it is. HQ-SAM's decoder computes the HQ features in every call from the same image
    embedding and first global block's output; here they are computed once per image.
    """

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size) -> None:
        self.reset_image()
        self.original_size = original_image_size
        self.input_size = tuple(transformed_image.shape[-2:])
        encoder, images = self.model.image_encoder, self.model.preprocess(transformed_image)
        if hasattr(encoder, "blocks") and self.in_pieces:
            self.features, interm = encode_vit(encoder, images)
        else:
            self.features, interm = encoder(images)
        decoder = self.model.mask_decoder
        early = interm[0].permute(0, 3, 1, 2)
        self.hq_features = decoder.embedding_encoder(self.features) + decoder.compress_vit_feat(
            early
        )
        self.is_image_set = True


@dataclass(frozen=True)
class HqDecodedPoints(DecodedPoints):
    """The point decoder's outputs plus which SAM output each point's mask is built on."""

    sam_output: torch.Tensor  # (points,) int64: 0 single-mask, 1..3 multimask


class HqPointDecoder(PointDecoder):
    """SAM 1's point decoder with HQ-SAM's output token and mask fusion."""

    def __init__(
        self, predictor: HqEncoderPredictor, *, hq_token_only: bool, multimask: bool
    ) -> None:
        super().__init__(predictor)
        self.hq_token_only = hq_token_only
        self.multimask = multimask

    def output_tokens(self) -> torch.Tensor:
        hq_token = self.predictor.model.mask_decoder.hf_token.weight
        return torch.cat([super().output_tokens(), hq_token], dim=0)

    def decode(self, points: np.ndarray, crop_size, *, per_pass: int = 1) -> HqDecodedPoints:
        """Scores as ``MaskDecoderHQ.forward`` selects them, the tokens in the shard layout
        and ``multimask`` as the module docstring states it."""
        decoder = self.predictor.model.mask_decoder
        hs, chunks = self.transformer_outputs(points, crop_size, per_pass)
        iou_preds = decoder.iou_prediction_head(hs[:, 0, :])
        out_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]  # SAM's four, then the HQ token
        mlps = [*decoder.output_hypernetworks_mlps, decoder.hf_mlp]
        hyper_in = torch.stack([mlp(out_tokens[:, i, :]) for i, mlp in enumerate(mlps)], dim=1)
        if self.multimask:
            # MaskDecoderHQ's slice(1, num_mask_tokens - 1): SAM's three multimask outputs
            # (its IoU head has no column for the HQ token)
            scores, best = torch.max(iou_preds[:, 1 : decoder.num_mask_tokens - 1], dim=1)
            sam_output = best + 1
        else:
            scores = iou_preds[:, 0]
            sam_output = torch.zeros(len(hs), dtype=torch.int64, device=hs.device)
        if self.hq_token_only or not self.multimask:  # the mask's own token is the HQ token
            multimask = torch.full_like(sam_output, -1)
        else:
            multimask = sam_output - 1
        tokens = torch.cat([out_tokens[:, -1:], out_tokens[:, 1:-1]], dim=1)
        return HqDecodedPoints(
            iou_preds=scores[:, None].float(),
            tokens=tokens.flatten(1).float(),
            hyper_in=hyper_in,
            image_keys=chunks,
            image_shape=tuple(self.predictor.features.shape[1:]),
            decoder=self,
            multimask=multimask[:, None],
            sam_output=sam_output,
        )

    def mask_logits(self, decoded: HqDecodedPoints, idx: torch.Tensor, keys: torch.Tensor):
        """(len(idx), 1, h', w'): ``MaskDecoderHQ.predict_masks`` and its output selection."""
        decoder = self.predictor.model.mask_decoder
        upscaled = upscale(decoder.output_upscaling, keys)
        upscaled = to_image_order(upscaled, decoded.image_shape[1:])
        n, c, h, w = upscaled.shape
        # the image's HQ features broadcast over the points, where HQ-SAM repeats them
        upscaled_hq = decoder.embedding_maskfeature(upscaled) + self.predictor.hq_features
        hyper_in = decoded.hyper_in[idx]
        masks_hq = (hyper_in[:, -1:] @ upscaled_hq.view(n, c, h * w)).view(n, -1, h, w)
        if self.hq_token_only:
            return masks_hq
        masks_sam = (hyper_in[:, :-1] @ upscaled.view(n, c, h * w)).view(n, -1, h, w)
        rows = torch.arange(n, device=masks_sam.device)
        chosen = masks_sam[rows, decoded.sam_output[idx]].unsqueeze(1)
        return chosen + masks_hq


class HqMaskEngine(AutomaticMaskEngine):
    """HQ-SAM's automatic masks with tokens (one mask per point), exact mode only.

    ``amg.hq_token_only`` and ``amg.multimask_output``: HQ-SAM's output choices (module
    docstring), defaults as in its automatic generator.
    """

    has_hq_outputs = True

    def __init__(self, model: torch.nn.Module, settings: AmgSettings | None = None) -> None:
        super().__init__(model, settings)
        self.hq_token_only = self.settings.hq_token_only
        self.multimask_output = self.settings.multimask_output
        self.predictor = HqEncoderPredictor(model)
        self.decoder = HqPointDecoder(
            self.predictor,
            hq_token_only=self.hq_token_only,
            multimask=self.multimask_output,
        )

    @property
    def token_dim(self) -> int:
        return TOKENS_PER_POINT * self.model.mask_decoder.transformer_dim

    def official_generator(self) -> Callable[[np.ndarray], list[dict[str, Any]]]:
        """HQ-SAM's generator; it passes no ``hq_token_only`` to its predictor, which then
        keeps its default (off), so the other choice is handed to the predictor."""
        generator = _package().SamAutomaticMaskGenerator(
            self.model, output_mode="coco_rle", **self.settings.as_kwargs()
        )
        predictor = generator.predictor
        predictor.predict_torch = partial(predictor.predict_torch, hq_token_only=self.hq_token_only)
        return partial(generator.generate, multimask_output=self.multimask_output)

    def official_predictor(self) -> Any:
        return _package().SamPredictor(self.model)

    def official_point_logits(self, crop: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """The official logits of a point's one mask, in each of the 3 slots the contract
        check indexes by ``multimask``."""
        predictor = self.official_predictor()
        predictor.set_image(crop)

        def logits(point: np.ndarray) -> np.ndarray:
            out, _, _ = predictor.predict(
                point[None],
                np.array([1]),
                multimask_output=self.multimask_output,
                return_logits=True,
                hq_token_only=self.hq_token_only,
            )
            return np.repeat(out, 3, axis=0)

        return logits


def encoder_shape(state_dict: dict[str, Any]) -> EncoderShape | None:
    """("HQ ViT" or "HQ TinyViT", width, depth) of an HQ-SAM state dict, else None."""
    if "mask_decoder.hf_token.weight" not in state_dict:
        return None
    shape = image_encoder_shape(state_dict)
    return None if shape is None else (f"HQ {shape[0]}", shape[1], shape[2])


def _official(name: str) -> torch.nn.Module:
    """HQ-SAM's own builder of ``name`` (vit_b, vit_l, vit_h, vit_tiny)."""
    return _package().sam_model_registry[name]()


def _build_tiny() -> torch.nn.Module:
    """The tiny test SAM's layout (``usam.sam.sam1_backend``) with HQ-SAM's decoder."""
    modeling = _package().modeling
    decoder = partial(modeling.MaskDecoderHQ, vit_dim=64)
    encoder = tiny_vit_encoder(modeling.ImageEncoderViT)
    return with_sam_heads(encoder, 256, mlp_dim=512, sam_class=modeling.Sam, decoder_class=decoder)


def _spec(model_type: str, build, kind: str, width: int, depth: int, name=None) -> SamSpec:
    return SamSpec(
        model_type,
        build,
        backend="hq",
        engine=HqMaskEngine,
        read_encoder=encoder_shape,
        encoder_kind=kind,
        encoder_width=width,
        encoder_depth=depth,
        checkpoint_name=name,
        url_base=URL_BASE,
        mask_mlp_attributes=("output_hypernetworks_mlps", "hf_mlp"),
        require=require,
    )


SPECS = (
    *(
        _spec(f"hq_vit_{size}", partial(_official, f"vit_{size}"), "HQ ViT", width,
              depth, f"sam_hq_vit_{size}.pth")
        for size, width, depth in (("b", 768, 12), ("l", 1024, 24), ("h", 1280, 32))
    ),
    _spec("hq_vit_tiny", partial(_official, "vit_tiny"), "HQ TinyViT", 64, 12,
          "sam_hq_vit_tiny.pth"),
    _spec("hq_tiny", _build_tiny, "HQ ViT", 64, 2),
)  # fmt: skip
