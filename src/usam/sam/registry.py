"""SAM model types: how to build each one and where its official weights come from.

``vit_h``, ``vit_l`` and ``vit_b`` are the official segment-anything architectures with
Meta's checkpoints. ``vit_t`` is MobileSAM: a TinyViT image encoder distilled from
ViT-H in front of SAM's own prompt encoder and mask decoder. Its encoder runs about 9x
faster than the official ``vit_b`` encoder on a CPU thread (about 6x faster than usam's
exact piecewise one), so it is the practical choice on a CPU when its accuracy is
enough. It needs the optional ``mobilesam-mirror`` package (and ``timm``, which that
package imports without declaring).

``sam2.1_hiera_t|s|b+|l`` are SAM 2.1 (``usam.sam.sam2_backend``, the optional ``sam2``
package): Hiera image encoders, several times cheaper than ViT-H, in front of a decoder
with the same four mask tokens.

``tiny`` and ``sam2.1_tiny`` are small SAM 1 and SAM 2.1 models with random weights
(fixed seed) so that tests and offline demos run in seconds without a download;
everything they produce is marked ``random_weights``. Their mask decoders keep the
official width of 256, so the 4 mask tokens of a point are 4 x 256 = 1024 values as
with the real models.

Each entry names its engine (``usam.sam.mask_engine.PointGridEngine`` subclass), so
everything downstream of the registry (extraction, annotation, the benchmarks) works
the same for every backend.
"""

from __future__ import annotations

import warnings
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

from usam.sam import checkpoints, sam2_backend
from usam.sam.amg_settings import AmgSettings
from usam.sam.mask_engine import PointGridEngine
from usam.sam.sam1_backend import AutomaticMaskEngine

DEFAULT_SEED = 0
_RANDOM_LOGIT_SCALE = 100.0
_URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
_MOBILE_SAM_URL_BASE = "https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/master/weights/"
_MOBILE_SAM_MISSING = (
    "sam=vit_t (MobileSAM) needs the optional packages mobilesam-mirror and timm: "
    "pip install mobilesam-mirror timm, or choose sam=vit_b, vit_l or vit_h"
)


def _mask_like_decoder(decoder: torch.nn.Module) -> None:
    """Make an untrained decoder's masks look like masks rather than noise (SAM 1's and
    SAM 2's decoders alike).

    With default initialisation the decoder's 2x2 transposed convolutions print a 4x4
    checkerboard on every mask, so each spans the whole image and NMS keeps one; their
    kernels are made uniform, and the hypernetworks' output scaled up so that logits
    sit as far from 0 as a trained SAM's and stability scores spread over [0, 1].
    """
    with torch.no_grad():
        for layer in decoder.output_upscaling:
            if isinstance(layer, torch.nn.ConvTranspose2d):
                uniform = layer.weight.mean(dim=(2, 3), keepdim=True)
                layer.weight.copy_(uniform.expand_as(layer.weight))
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(_RANDOM_LOGIT_SCALE)


@dataclass(frozen=True)
class SamSpec:
    """One buildable SAM. ``checkpoint_name`` is None for architectures with no official weights.

    Neither Meta nor MobileSAM publish checksums; the SHA-256 sums of SAM 1 and MobileSAM
    below are the ones that independent projects verifying these downloads agree on
    (e.g. micro-sam's model table). For SAM 2.1 no such agreed sums were found, so they
    are None: the download is not verified, and the SHA-256 of the file actually loaded
    is what the shard manifest records. ``encoder_kind``, ``encoder_width`` and
    ``encoder_depth`` are what :func:`identify` reads off a state dict: for a ViT the
    patch embedding width and the block count, for a TinyViT the first stage's width and
    the blocks of all stages, for a Hiera its patch embedding width and block count.
    ``backend`` names the model family in shard manifests; ``engine`` makes its
    automatic masks; ``state_key`` is where a checkpoint file keeps the state dict
    (SAM 2's files hold it under ``model``); ``decoder_attribute`` names the mask decoder;
    ``require`` fails early, naming the install line, when its optional package is missing.
    """

    model_type: str
    build: Callable[[], torch.nn.Module]
    encoder_width: int
    encoder_depth: int
    checkpoint_name: str | None = None
    sha256: str | None = None
    url_base: str = _URL_BASE
    encoder_kind: str = "ViT"
    backend: str = "sam"
    engine: type[PointGridEngine] = AutomaticMaskEngine
    state_key: str | None = None
    decoder_attribute: str = "mask_decoder"
    require: Callable[[str], None] | None = None  # checks an optional package is installed

    @property
    def url(self) -> str | None:
        return None if self.checkpoint_name is None else self.url_base + self.checkpoint_name

    @property
    def random_weights(self) -> bool:
        """True when the architecture has no trained weights to load."""
        return self.checkpoint_name is None


def _with_sam_heads(image_encoder: torch.nn.Module, image_size: int, mlp_dim: int) -> Sam:
    """SAM's prompt encoder and mask decoder (width 256) behind ``image_encoder``.

    Built after the encoder, in the order of the official builders, so that a seeded
    build draws the same weights as ``segment_anything``'s and ``mobile_sam``'s.
    """
    dim, grid = 256, image_size // 16
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=8),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _build_tiny() -> Sam:
    image_size = 256
    encoder = ImageEncoderViT(
        img_size=image_size,
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
    return _with_sam_heads(encoder, image_size, mlp_dim=512)


def _tiny_vit_class() -> type[torch.nn.Module]:
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
        raise ImportError(f"{_MOBILE_SAM_MISSING} ({error})") from error
    return TinyViT


def _build_vit_t() -> Sam:
    """MobileSAM with the hyper-parameters of ``mobile_sam.build_sam_vit_t``.

    A ``segment_anything`` Sam rather than MobileSAM's copy of the class (its prompt
    encoder and mask decoder are the same code), so SamPredictor and the engine take it.
    """
    encoder = _tiny_vit_class()(
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
    return _with_sam_heads(encoder, 1024, mlp_dim=2048)


def _sam2_spec(
    model_type: str,
    config: str,
    width: int,
    depth: int,
    checkpoint_name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> SamSpec:
    return SamSpec(
        model_type,
        partial(sam2_backend.build, config, model_type, overrides),
        encoder_width=width,
        encoder_depth=depth,
        checkpoint_name=checkpoint_name,
        url_base=sam2_backend.URL_BASE,
        encoder_kind="Hiera",
        backend="sam2",
        engine=sam2_backend.Sam2MaskEngine,
        state_key="model",
        decoder_attribute="sam_mask_decoder",
        require=sam2_backend.require,
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
    "vit_t": SamSpec(
        "vit_t",
        _build_vit_t,
        encoder_width=64,
        encoder_depth=12,
        checkpoint_name="mobile_sam.pt",
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        url_base=_MOBILE_SAM_URL_BASE,
        encoder_kind="TinyViT",
    ),
    "tiny": SamSpec("tiny", _build_tiny, encoder_width=64, encoder_depth=2),
    **{
        f"sam2.1_hiera_{size}": _sam2_spec(
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
    },
    "sam2.1_tiny": _sam2_spec(
        "sam2.1_tiny", "sam2.1_hiera_t.yaml", 8, 5, overrides=sam2_backend.TINY_OVERRIDES
    ),
}


def get_spec(model_type: str) -> SamSpec:
    if model_type not in SPECS:
        raise ValueError(f"unknown SAM model type {model_type!r}; choose one of {sorted(SPECS)}")
    return SPECS[model_type]


@dataclass(frozen=True)
class SamSettings:
    """The ``sam`` config group: which SAM, and where its weights are."""

    model_type: str = "vit_h"
    checkpoint: str | None = None  # the official checkpoint file; None: cache, then download

    def check(self) -> None:
        spec = get_spec(self.model_type)
        if spec.require is not None:
            spec.require(self.model_type)

    def identity(self) -> dict[str, Any]:
        """What names this SAM for caching, known without loading or hashing the checkpoint."""
        return {"model_type": self.model_type, "checkpoint": self.checkpoint or None}

    def build(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        return build_sam(self.model_type, self.checkpoint)

    def ensure_weights(self) -> Path | None:
        """The checkpoint this SAM will load (downloaded now when missing and online), or
        None for random weights; raises ``CheckpointError`` naming ``sam.checkpoint``."""
        return _weights_path(get_spec(self.model_type), self.checkpoint)


def _encoder_shape(state_dict: dict[str, Any]) -> tuple[str, int, int] | None:
    """(kind, width, depth) of the image encoder a state dict holds; None if it holds none."""
    vit = state_dict.get("image_encoder.patch_embed.proj.weight")
    if isinstance(vit, torch.Tensor):
        blocks = {k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")}
        return "ViT", vit.shape[0], len(blocks)
    hiera = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if isinstance(hiera, torch.Tensor):
        blocks = {
            k.split(".")[3] for k in state_dict if k.startswith("image_encoder.trunk.blocks.")
        }
        return "Hiera", hiera.shape[0], len(blocks)
    tiny_vit = state_dict.get("image_encoder.patch_embed.seq.2.c.weight")
    if isinstance(tiny_vit, torch.Tensor):
        parts = [k.split(".") for k in state_dict if k.startswith("image_encoder.layers.")]
        blocks = {(p[2], p[4]) for p in parts if len(p) > 4 and p[3] == "blocks"}
        return "TinyViT", tiny_vit.shape[0], len(blocks)
    return None


def identify(state_dict: dict[str, Any]) -> str | None:
    """Which registered architecture a state dict was saved from, judged by its encoder shape."""
    shape = _encoder_shape(state_dict)
    if shape is None:
        return None
    for spec in SPECS.values():
        if (spec.encoder_kind, spec.encoder_width, spec.encoder_depth) == shape:
            return spec.model_type
    kind, width, depth = shape
    return f"an unregistered {kind} encoder of width {width} and depth {depth}"


def build_random(model_type: str, seed: int = DEFAULT_SEED) -> torch.nn.Module:
    """Random weights drawn from ``seed`` (leaving the global RNG alone), decoder made mask-like."""
    spec = get_spec(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build()
    _mask_like_decoder(getattr(model, spec.decoder_attribute))
    return model.eval()


def _weights_path(spec: SamSpec, checkpoint: str | Path | None) -> Path | None:
    """None for an architecture without official weights and no checkpoint given."""
    if spec.random_weights and checkpoint is None:
        return None
    if checkpoint is None:
        return checkpoints.resolve(spec.checkpoint_name, spec.url, spec.sha256)
    return checkpoints.resolve(Path(checkpoint).name, None, None, explicit=checkpoint)


def build_sam(
    model_type: str,
    checkpoint: str | Path | None = None,
    *,
    random_weights: bool = False,
    seed: int = DEFAULT_SEED,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build a SAM in eval mode and describe it for the shard manifest.

    With ``random_weights`` (or for an architecture without official weights and no
    ``checkpoint``) the weights are the seeded default initialisation. Otherwise the
    checkpoint is resolved (explicit path, cache, download) and loaded.
    """
    spec = get_spec(model_type)
    path = None if random_weights else _weights_path(spec, checkpoint)
    named = {"model_type": model_type, "backend": spec.backend}
    if path is None:
        info = {**named, "checkpoint_sha256": None, "random_weights": True, "seed": seed}
        return build_random(model_type, seed), info
    model = spec.build()
    checkpoints.load_into(model, path, model_type, identify=identify, state_key=spec.state_key)
    model.eval()  # after loading: TinyViT caches its attention biases when put in eval mode
    info = {**named, "checkpoint_sha256": checkpoints.sha256_of(path), "random_weights": False}
    return model, info


def build_engine(model_type: str, model: torch.nn.Module, settings: AmgSettings) -> PointGridEngine:
    """The automatic mask engine of ``model``'s backend."""
    return get_spec(model_type).engine(model, settings)
