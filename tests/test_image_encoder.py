"""The piecewise ViT image encoder against the official ``ImageEncoderViT.forward``."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT

from usam.sam import image_encoder
from usam.sam.image_encoder import EncoderPredictor, encode_image
from usam.sam.registry import build_sam

# The encoder is the official computation; other CPUs, instruction sets and piece shapes
# may round differently, so it is held to float32 rounding: 1e-5 of its largest value.
EMBEDDING_RTOL = 1e-5


def assert_official(ours: torch.Tensor, official: torch.Tensor) -> None:
    assert ours.shape == official.shape
    bound = EMBEDDING_RTOL * max(1.0, official.abs().max().item())
    assert (ours - official).abs().max().item() <= bound


def vit(window_size: int, global_blocks: tuple[int, ...], use_rel_pos: bool) -> ImageEncoderViT:
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=320,
        patch_size=16,
        embed_dim=48,
        depth=3,
        num_heads=3,
        out_chans=32,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=use_rel_pos,
        window_size=window_size,
        global_attn_indexes=global_blocks,
    )
    for module in encoder.modules():  # the official init leaves relative positions at zero
        if hasattr(module, "rel_pos_h"):
            torch.nn.init.normal_(module.rel_pos_h, std=0.5)
            torch.nn.init.normal_(module.rel_pos_w, std=0.5)
    return encoder.eval()


@pytest.mark.parametrize("logits_per_piece", [97, 2_000, 1 << 20])
@pytest.mark.parametrize(
    ("window_size", "global_blocks", "use_rel_pos"),
    [(7, (1,), True), (5, (), True), (0, (), True), (7, (2,), False)],
)
def test_the_official_encoder_up_to_float32_rounding(
    monkeypatch, logits_per_piece, window_size, global_blocks, use_rel_pos
):
    """Windows with padding (20 x 20 tokens in 7 x 7 windows), global blocks, with and
    without relative positions, in pieces of single rows up to whole maps.
    """
    monkeypatch.setattr(image_encoder, "_LOGITS_PER_PIECE", logits_per_piece)
    encoder = vit(window_size, global_blocks, use_rel_pos)
    images = torch.randn(2, 3, 320, 320)
    with torch.no_grad():
        assert_official(encode_image(encoder, images), encoder(images))


def test_the_predictor_holds_the_official_embedding():
    sam = build_sam("tiny")[0]
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    ours, official = EncoderPredictor(sam), SamPredictor(sam)
    ours.set_image(image)
    official.set_image(image)
    assert_official(ours.features, official.features)
    assert (ours.input_size, ours.original_size) == (official.input_size, official.original_size)
    with pytest.raises(ValueError, match="long side 256"):
        ours.set_torch_image(torch.zeros(1, 3, 100, 100), (100, 100))
