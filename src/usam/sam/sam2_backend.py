"""SAM 2.1 as a mask-proposal backend: its models and its automatic masks with tokens.

The models are Meta's ``sam2`` package (``pip install usam[sam2]``), built from the
config files it ships, so a checkpoint of ``sam2.1_hiera_t|s|b+|l`` loads as it does
in SAM 2's own ``build_sam2``. Importing ``sam2`` initialises Hydra globally for those
configs, which would stop a later Hydra application in the same process; usam reads the
files directly and undoes that initialisation.

:class:`Sam2MaskEngine` runs the computation of
``sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator`` (points, predictor,
filters, NMS; ``use_m2m`` off, multimask on), under the same contract as the SAM 1
engine (``usam.sam.mask_engine``). Its decoder runs as the SAM 1 engine's does
(``usam.sam.decoder_attention``): the two-way transformer's token side on the official
point batch, its image side (4096 x 256 values per point) one point at a time on a CPU so
that it stays in cache and the whole batch at once on a GPU (``amg.tuned_for``), with
SAM 2's fused attention kernel. That gives the predicted IoUs and
the four mask tokens (``hs[:, s + 1 : s + 5]`` after the object-score token, 4 x 256
values, the same layout as SAM 1's); the upscaling with the high-resolution features,
and the upsampling to the crop, run only for the points some mask of which passed the
IoU filter. SAM 2's generator has no small-region pass after NMS: it hands
``min_mask_region_area`` to its predictor, which fills holes and removes sprinkles in
the low-res logits with the ``sam2`` CUDA extension (and skips that, with a warning,
where the extension is missing); the engine uses that same predictor code.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from importlib.resources import files
from typing import Any

import numpy as np
import torch

from usam.core.errors import UsageError
from usam.sam.amg_settings import AmgSettings
from usam.sam.backend_spec import EncoderShape, SamSpec
from usam.sam.decoder_attention import ImageSides, two_way_transformer
from usam.sam.mask_engine import PointGridEngine
from usam.sam.mask_upscaling import blocked_high_res, masks_from, upscale
from usam.sam.point_decoder import DecodedPoints

MISSING = (
    "sam={model_type} needs Meta's sam2 package: "
    "SAM2_BUILD_CUDA=0 pip install --no-build-isolation 'sam2==1.1.0' (after torch), "
    "or choose a SAM 1 model (sam=vit_b, vit_l, vit_h, vit_t)"
)
URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
# The test-sized SAM 2.1: Hiera-T's layout with an 8-wide trunk of 5 blocks. The image
# size stays 1024, which SAM 2's predictor assumes; the decoder keeps its width of 256.
TINY_OVERRIDES = {
    "image_encoder": {
        "trunk": {
            "embed_dim": 8,
            "stages": [1, 1, 2, 1],
            "global_att_blocks": [3],
            "window_spec": [8, 4, 4, 4],
        },
        "neck": {"backbone_channel_list": [64, 32, 16, 8]},
    },
    "memory_attention": {"num_layers": 1},
}


class Sam2Missing(UsageError, ImportError):
    """The optional ``sam2`` package is not installed."""


def require(model_type: str) -> None:
    """Import ``sam2`` without leaving Hydra initialised; say how to install it if missing."""
    from hydra.core.global_hydra import GlobalHydra

    hydra_was_set = GlobalHydra.instance().is_initialized()
    try:
        import sam2.modeling.sam2_base  # noqa: F401
    except ImportError as error:
        raise Sam2Missing(f"{MISSING.format(model_type=model_type)} ({error})") from error
    finally:
        if not hydra_was_set:
            GlobalHydra.instance().clear()


def build(config_name: str, model_type: str, overrides: dict[str, Any] | None = None):
    """A SAM 2 model from one of the config files ``sam2`` ships (``sam2.1_hiera_t.yaml``)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    require(model_type)
    config = OmegaConf.load(files("sam2") / "configs" / "sam2.1" / config_name)
    if overrides:
        config = OmegaConf.merge(config, {"model": overrides})
    OmegaConf.resolve(config)
    return instantiate(config.model, _recursive_=True)


class Sam2MaskEngine(PointGridEngine):
    """Automatic masks plus mask tokens of a SAM 2 model (``sam2.modeling.SAM2Base``)."""

    cleans_small_regions_after_nms = False

    def __init__(self, model: torch.nn.Module, settings: AmgSettings | None = None) -> None:
        super().__init__(model, settings)
        self.predictor = self.official_predictor()
        # the reused image-side state, per device and dtype; the positional encoding is
        # the model's
        self._sides = ImageSides(model.sam_prompt_encoder.get_dense_pe)
        self._image: torch.Tensor | None = None  # the image embedding of the crop set
        self._high_res: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def token_dim(self) -> int:
        decoder = self.model.sam_mask_decoder
        return decoder.num_mask_tokens * decoder.transformer_dim

    @property
    def mask_threshold(self) -> float:
        return self.predictor.mask_threshold

    def official_generator(self) -> Callable[[np.ndarray], list[dict[str, Any]]]:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        s = self.settings.as_kwargs()
        generator = SAM2AutomaticMaskGenerator(self.model, output_mode="coco_rle", **s)
        return generator.generate

    def official_predictor(self) -> Any:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        area = self.settings.min_mask_region_area
        return SAM2ImagePredictor(self.model, max_hole_area=area, max_sprinkle_area=area)

    def set_image(self, crop: np.ndarray) -> None:
        self.predictor.set_image(crop)
        features = self.predictor._features
        self._image = features["image_embed"][-1:]
        self._high_res = blocked_high_res(*(level[-1:] for level in features["high_res_feats"]))

    def reset_image(self) -> None:
        self.predictor.reset_predictor()
        self._image = self._high_res = None

    def decode(self, points: np.ndarray, crop_size: tuple[int, int]) -> DecodedPoints:
        """``MaskDecoder.predict_masks`` up to the upscaling, its image side by pass of
        ``points_per_pass`` points."""
        predictor, model = self.predictor, self.model
        decoder = model.sam_mask_decoder
        coords = predictor._transforms.transform_coords(
            torch.as_tensor(points, dtype=torch.float32, device=predictor.device),
            normalize=True,
            orig_hw=crop_size,
        )
        labels = torch.ones(len(coords), dtype=torch.int, device=coords.device)
        sparse, dense = model.sam_prompt_encoder(
            points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None
        )
        first = 1 if decoder.pred_obj_scores else 0
        heads = [decoder.iou_token.weight, decoder.mask_tokens.weight]
        if first:
            heads.insert(0, decoder.obj_score_token.weight)
        output_tokens = torch.cat(heads).unsqueeze(0).expand(sparse.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)
        image = self._image
        hs, chunks = two_way_transformer(
            decoder.transformer, tokens, image, dense, self._sides, chunk=self.points_per_pass
        )
        mask_tokens = hs[:, first + 1 : first + 1 + decoder.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
            dim=1,
        )
        iou_preds = decoder.iou_prediction_head(hs[:, first, :])
        return DecodedPoints(
            iou_preds=iou_preds[:, 1:].float(),
            tokens=mask_tokens.flatten(1).float(),
            hyper_in=hyper_in,
            image_keys=chunks,
            image_shape=tuple(image.shape[1:]),
            decoder=self,
            multimask=torch.arange(3, device=hs.device).expand(len(hs), 3),
        )

    def mask_logits(self, decoded: DecodedPoints, idx: torch.Tensor, keys: torch.Tensor):
        """Multimask low-res logits (len(idx), 3, h', w') of points ``idx`` from their final
        image keys, with the crop's high-resolution features, as SAM 2's decoder makes them."""
        upscaling = self.model.sam_mask_decoder.output_upscaling
        upscaled = upscale(upscaling, keys, self._high_res)
        return masks_from(upscaled, decoded.hyper_in[idx, 1:], decoded.image_shape[1:])

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        transforms = self.predictor._transforms
        return transforms.postprocess_masks(low_res[:, None], self.predictor._orig_hw[-1])[:, 0]


def encoder_shape(state_dict: dict[str, Any]) -> EncoderShape | None:
    """("Hiera", patch embedding width, block count) of a SAM 2 state dict, else None."""
    hiera = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if not isinstance(hiera, torch.Tensor):
        return None
    blocks = {k.split(".")[3] for k in state_dict if k.startswith("image_encoder.trunk.blocks.")}
    return "Hiera", hiera.shape[0], len(blocks)


def _spec(
    model_type: str,
    config: str,
    width: int,
    depth: int,
    checkpoint_name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> SamSpec:
    """Meta publishes no checksums for SAM 2.1 and none agreed on elsewhere were found:
    its downloads are not verified (``sha256`` None)."""
    return SamSpec(
        model_type,
        partial(build, config, model_type, overrides),
        backend="sam2",
        engine=Sam2MaskEngine,
        read_encoder=encoder_shape,
        encoder_kind="Hiera",
        encoder_width=width,
        encoder_depth=depth,
        checkpoint_name=checkpoint_name,
        url_base=URL_BASE,
        state_key="model",
        decoder_attribute="sam_mask_decoder",
        require=require,
    )


SPECS = (
    *(
        _spec(
            f"sam2.1_hiera_{size}",
            f"sam2.1_hiera_{size}.yaml",
            width,
            depth,
            f"sam2.1_hiera_{name}.pt",
        )
        for size, name, width, depth in (
            ("t", "tiny", 96, 12),
            ("s", "small", 96, 16),
            ("b+", "base_plus", 112, 24),
            ("l", "large", 144, 48),
        )
    ),
    _spec("sam2.1_tiny", "sam2.1_hiera_t.yaml", 8, 5, overrides=TINY_OVERRIDES),
)
