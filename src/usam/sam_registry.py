"""SAM model types: how to build each one and where its official weights come from.

``vit_h``, ``vit_l`` and ``vit_b`` are the official segment-anything architectures with
Meta's checkpoints. ``tiny`` is a small SAM with random weights (fixed seed) so that
tests and offline demos run in seconds without a download; everything it produces is
marked ``random_weights``. Its mask decoder keeps the official width of 256, so the 4
mask tokens of a point are 4 x 256 = 1024 values as with the real models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything import build_sam_vit_b, build_sam_vit_h, build_sam_vit_l
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from usam import checkpoints

DEFAULT_SEED = 0
_RANDOM_LOGIT_SCALE = 100.0
_URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class SamSpec:
    """One buildable SAM. ``checkpoint_name`` is None for architectures with no official weights.

    Meta publishes no checksums; the SHA-256 sums below are the ones that independent
    projects verifying these downloads agree on (e.g. micro-sam's model table).
    """

    model_type: str
    build: Callable[[], Sam]
    encoder_width: int
    encoder_depth: int
    checkpoint_name: str | None = None
    sha256: str | None = None

    @property
    def url(self) -> str | None:
        return None if self.checkpoint_name is None else _URL_BASE + self.checkpoint_name

    @property
    def random_weights(self) -> bool:
        """True when the architecture has no trained weights to load."""
        return self.checkpoint_name is None


def _build_tiny() -> Sam:
    image_size, patch_size, dim = 256, 16, 256
    grid = image_size // patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=4,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=512, num_heads=8),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


SPECS: dict[str, SamSpec] = {
    "vit_h": SamSpec(
        "vit_h",
        build_sam_vit_h,
        encoder_width=1280,
        encoder_depth=32,
        checkpoint_name="sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    "vit_l": SamSpec(
        "vit_l",
        build_sam_vit_l,
        encoder_width=1024,
        encoder_depth=24,
        checkpoint_name="sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_b": SamSpec(
        "vit_b",
        build_sam_vit_b,
        encoder_width=768,
        encoder_depth=12,
        checkpoint_name="sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "tiny": SamSpec("tiny", _build_tiny, encoder_width=64, encoder_depth=2),
}


def get_spec(model_type: str) -> SamSpec:
    if model_type not in SPECS:
        raise ValueError(f"unknown SAM model type {model_type!r}; choose one of {sorted(SPECS)}")
    return SPECS[model_type]


def identify(state_dict: dict[str, Any]) -> str | None:
    """Which registered architecture a state dict was saved from, judged by its encoder shape."""
    embed = state_dict.get("image_encoder.patch_embed.proj.weight")
    if not isinstance(embed, torch.Tensor):
        return None
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for spec in SPECS.values():
        if (spec.encoder_width, spec.encoder_depth) == (embed.shape[0], depth):
            return spec.model_type
    return f"an unregistered encoder of width {embed.shape[0]} and depth {depth}"


def _mask_like_decoder(sam: Sam) -> None:
    """Make an untrained decoder's masks look like masks rather than noise.

    With default initialisation the decoder's 2x2 transposed convolutions print a 4x4
    checkerboard on every mask, so each spans the whole image and NMS keeps one; their
    kernels are made uniform, and the hypernetworks' output scaled up so that logits
    sit as far from 0 as a trained SAM's and stability scores spread over [0, 1].
    """
    decoder = sam.mask_decoder
    with torch.no_grad():
        for layer in decoder.output_upscaling:
            if isinstance(layer, torch.nn.ConvTranspose2d):
                uniform = layer.weight.mean(dim=(2, 3), keepdim=True)
                layer.weight.copy_(uniform.expand_as(layer.weight))
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(_RANDOM_LOGIT_SCALE)


def build_random(model_type: str, seed: int = DEFAULT_SEED) -> Sam:
    """Random weights drawn from ``seed`` (leaving the global RNG alone), decoder made mask-like."""
    spec = get_spec(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build()
    _mask_like_decoder(model)
    return model.eval()


def build_sam(
    model_type: str,
    checkpoint: str | Path | None = None,
    *,
    random_weights: bool = False,
    seed: int = DEFAULT_SEED,
) -> tuple[Sam, dict[str, Any]]:
    """Build a SAM in eval mode and describe it for the shard manifest.

    With ``random_weights`` (or for an architecture without official weights and no
    ``checkpoint``) the weights are the seeded default initialisation. Otherwise the
    checkpoint is resolved (explicit path, cache, download) and loaded.
    """
    spec = get_spec(model_type)
    if random_weights or (spec.random_weights and checkpoint is None):
        info = {"model_type": model_type, "checkpoint_sha256": None, "random_weights": True}
        return build_random(model_type, seed), {**info, "seed": seed}
    if checkpoint is None:
        path = checkpoints.resolve(spec.checkpoint_name, spec.url, spec.sha256)
    else:
        path = checkpoints.resolve(Path(checkpoint).name, None, None, explicit=checkpoint)
    model = spec.build().eval()
    checkpoints.load_into(model, path, model_type, identify=identify)
    info = {
        "model_type": model_type,
        "checkpoint_sha256": checkpoints.sha256_of(path),
        "random_weights": False,
    }
    return model, info
