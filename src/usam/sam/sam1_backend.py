"""SAM 1 as a mask-proposal backend: its models (vit_h/l/b, MobileSAM's vit_t, the tiny
test SAM) and their engine.

``vit_h``, ``vit_l`` and ``vit_b`` are the official segment-anything architectures with
Meta's checkpoints. ``vit_t`` is MobileSAM: a TinyViT image encoder distilled from
ViT-H in front of SAM's own prompt encoder and mask decoder. Its encoder runs about 9x
faster than the official ``vit_b`` encoder on a CPU thread (about 6x faster than usam's
exact piecewise one), so it is the practical choice on a CPU when its accuracy is
enough. It needs the optional ``mobilesam-mirror`` package (and ``timm``, which that
package imports without declaring). ``tiny`` is a small SAM with random weights (fixed
seed) so that tests and offline demos run in seconds without a download; its mask
decoder keeps the official width of 256, so the 4 mask tokens of a point are
4 x 256 = 1024 values as with the real models.

Neither Meta nor MobileSAM publish checksums; the SHA-256 sums below are the ones that
independent projects verifying these downloads agree on (e.g. micro-sam's model table).

The engine holds to the contract of ``usam.sam.mask_engine``, which bounds results,
not arithmetic: the decoder's products are reassociated where that is exact in real
arithmetic, so masks and predicted IoUs match the official ones up to float32 rounding
(measured figures in the README's Performance section); a pixel flipped far from the
threshold, or a score off by 1e-3, breaks the contract.

The mask tokens are the two-way transformer's output ``hs[:, 1:5]``.

Where the time goes and what is done about it:

* The image encoder computes its attention in cache-sized pieces, bit for bit as the
  official one (``usam.sam.image_encoder``): about 3x faster than it on an Intel CPU,
  1.5-2.6x on the 2-core AMD EPYC, where others' memory traffic slows the official one.
* The mask decoder's image side (4096 x 256 values per point for the 1024-pixel models)
  runs one point at a time on a CPU so that it stays in cache (the whole batch at once on
  a GPU: ``amg.tuned_for``), with the attention projections
  folded into the 7 tokens and the first layer's image projections made once per image
  (``usam.sam.decoder_attention``), and the upscaling as matrix products
  (``usam.sam.mask_upscaling``): for vit_b 1.81 GFLOP per point, transformer and
  upscaling, against the official 3.63 (``benchmarks/extract_speed.py`` counts both).

The small-region cleanup after NMS comes from ``segment_anything`` itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from segment_anything import (
    SamAutomaticMaskGenerator,
    SamPredictor,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
)
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from usam.core.errors import UsageError
from usam.sam.amg_settings import AmgSettings
from usam.sam.backend_spec import EncoderShape, SamSpec
from usam.sam.image_encoder import EncoderPredictor
from usam.sam.mask_engine import DecodedBatch, PointGridEngine
from usam.sam.point_decoder import PointDecoder


class AutomaticMaskEngine(PointGridEngine):
    """SAM 1 (vit_h/l/b, MobileSAM, the tiny test SAM): the official generator's
    computation, with the piecewise encoder on a CPU and the point decoder
    (``usam.sam.point_decoder.PointDecoder``)."""

    def __init__(self, sam: Sam, settings: AmgSettings | None = None):
        super().__init__(sam, settings)
        self.predictor = EncoderPredictor(sam)
        self.decoder = PointDecoder(self.predictor)

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
        self.predictor.in_pieces = self.tuning == "cpu"
        self.predictor.set_image(crop)

    def reset_image(self) -> None:
        self.predictor.reset_image()

    def decode(self, points: np.ndarray, crop_size: tuple[int, int]) -> DecodedBatch:
        return self.decoder.decode(points, crop_size, per_pass=self.points_per_pass)

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        predictor = self.predictor
        return self.model.postprocess_masks(
            low_res[:, None], predictor.input_size, predictor.original_size
        )[:, 0]

    def upsampling_pixels(self, crop_size: tuple[int, int]) -> int:
        """SAM 1's upsampling passes through the encoder's square input (1024 x 1024)."""
        return max(super().upsampling_pixels(crop_size), self.model.image_encoder.img_size**2)


URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
_MOBILE_SAM_URL_BASE = "https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/master/weights/"
_MOBILE_SAM_MISSING = (
    "sam={model_type} (MobileSAM) needs the optional packages mobilesam-mirror and timm: "
    "pip install mobilesam-mirror timm, or choose sam=vit_b, vit_l or vit_h"
)
# The parts of SAM 1's mask decoder: a state dict with others is another family's.
_DECODER_PARTS = frozenset(
    {
        "transformer",
        "iou_token",
        "mask_tokens",
        "output_upscaling",
        "output_hypernetworks_mlps",
        "iou_prediction_head",
    }
)


class MobileSamMissing(UsageError, ImportError):
    """The optional MobileSAM package (or timm, which it imports) is not installed."""


def with_sam_heads(
    image_encoder: torch.nn.Module,
    image_size: int,
    mlp_dim: int,
    *,
    sam_class: type[torch.nn.Module] = Sam,
    decoder_class: Callable[..., torch.nn.Module] = MaskDecoder,
) -> torch.nn.Module:
    """SAM's prompt encoder and mask decoder (width 256) behind ``image_encoder``.

    Built after the encoder, in the order of the official builders, so that a seeded
    build draws the same weights as ``segment_anything``'s and ``mobile_sam``'s.
    ``sam_class`` and ``decoder_class`` let HQ-SAM's ``Sam`` and decoder take the places
    of SAM 1's.
    """
    dim, grid = 256, image_size // 16
    prompt_encoder = PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = decoder_class(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=8),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return sam_class(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def tiny_vit_encoder(encoder_class=ImageEncoderViT) -> torch.nn.Module:
    """The tiny test SAM's ViT: 2 blocks of width 64 on 256-pixel images, one global."""
    return encoder_class(
        img_size=256,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=4,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1,),
    )


def _build_tiny() -> Sam:
    return with_sam_heads(tiny_vit_encoder(), 256, mlp_dim=512)


def require_mobile_sam(model_type: str) -> None:
    _tiny_vit_class(model_type)


def _tiny_vit_class(model_type: str = "vit_t") -> type[torch.nn.Module]:
    """MobileSAM's TinyViT, imported only when asked for, so usam runs without it.

    The import registers MobileSAM's TinyViT variants in timm's model registry (over
    timm's own of the same names) and warns about timm's renamed modules; the warnings
    are silenced, the registration cannot be avoided.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mobile_sam.modeling import TinyViT
    except ImportError as error:
        message = _MOBILE_SAM_MISSING.format(model_type=model_type)
        raise MobileSamMissing(f"{message} ({error})") from error
    return TinyViT


def tiny_vit_kwargs() -> dict[str, Any]:
    """The hyper-parameters of MobileSAM's TinyViT (``mobile_sam.build_sam_vit_t``)."""
    return dict(
        img_size=1024,
        in_chans=3,
        num_classes=1000,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def _build_vit_t() -> Sam:
    """MobileSAM as a ``segment_anything`` Sam rather than MobileSAM's copy of the class
    (its prompt encoder and mask decoder are the same code), so SamPredictor and the
    engine take it.
    """
    return with_sam_heads(_tiny_vit_class()(**tiny_vit_kwargs()), 1024, mlp_dim=2048)


def image_encoder_shape(state_dict: dict[str, Any]) -> EncoderShape | None:
    """(kind, width, depth) of a SAM 1 image encoder, ViT or TinyViT: for a ViT the patch
    embedding width and the block count, for a TinyViT the first stage's width and the
    blocks of all stages; None if the state dict holds neither.
    """
    vit = state_dict.get("image_encoder.patch_embed.proj.weight")
    if isinstance(vit, torch.Tensor):
        blocks = {k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")}
        return "ViT", vit.shape[0], len(blocks)
    tiny_vit = state_dict.get("image_encoder.patch_embed.seq.2.c.weight")
    if isinstance(tiny_vit, torch.Tensor):
        parts = [k.split(".") for k in state_dict if k.startswith("image_encoder.layers.")]
        blocks = {(p[2], p[4]) for p in parts if len(p) > 4 and p[3] == "blocks"}
        return "TinyViT", tiny_vit.shape[0], len(blocks)
    return None


def _encoder_shape(state_dict: dict[str, Any]) -> EncoderShape | None:
    """A SAM 1 state dict's encoder shape; None for another family's, such as one whose
    mask decoder has parts SAM 1's lacks."""
    decoder_parts = {k.split(".")[1] for k in state_dict if k.startswith("mask_decoder.")}
    if not decoder_parts <= _DECODER_PARTS:
        return None
    return image_encoder_shape(state_dict)


def _spec(model_type: str, build, kind: str, width: int, depth: int, **official) -> SamSpec:
    return SamSpec(
        model_type,
        build,
        backend="sam",
        engine=AutomaticMaskEngine,
        read_encoder=_encoder_shape,
        encoder_kind=kind,
        encoder_width=width,
        encoder_depth=depth,
        **official,
    )


SPECS = (
    _spec(
        "vit_h",
        build_sam_vit_h,
        "ViT",
        1280,
        32,
        checkpoint_name="sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        url_base=URL_BASE,
    ),
    _spec(
        "vit_l",
        build_sam_vit_l,
        "ViT",
        1024,
        24,
        checkpoint_name="sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        url_base=URL_BASE,
    ),
    _spec(
        "vit_b",
        build_sam_vit_b,
        "ViT",
        768,
        12,
        checkpoint_name="sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        url_base=URL_BASE,
    ),
    _spec(
        "vit_t",
        _build_vit_t,
        "TinyViT",
        64,
        12,
        checkpoint_name="mobile_sam.pt",
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        url_base=_MOBILE_SAM_URL_BASE,
        require=require_mobile_sam,
    ),
    _spec("tiny", _build_tiny, "ViT", 64, 2),
)
