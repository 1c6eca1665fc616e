"""``sam=vit_t`` (MobileSAM): registry entry, seeded stand-in, checkpoints, the official masks."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from usam.sam.amg_settings import AmgSettings
from usam.sam.checkpoints import CheckpointError
from usam.sam.registry import SPECS, build_sam, identify
from usam.sam.sam1_backend import AutomaticMaskEngine

from helpers.official_amg import assert_matches_official, shapes_image

mobile_sam = pytest.importorskip("mobile_sam", reason="sam=vit_t needs mobilesam-mirror")


@pytest.fixture(scope="module")
def sam():
    return build_sam("vit_t", random_weights=True)[0]


def tiny_vit_attentions(model):
    return [m for m in model.image_encoder.modules() if hasattr(m, "attention_bias_idxs")]


def test_registry_names_the_official_checkpoint():
    spec = SPECS["vit_t"]
    assert not spec.random_weights and spec.encoder_kind == "TinyViT"
    assert spec.checkpoint_name == "mobile_sam.pt"
    assert spec.url == (
        "https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/master/weights/mobile_sam.pt"
    )
    assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)


def test_random_stand_in_is_seeded_marked_and_is_mobilesam(sam):
    state = torch.random.get_rng_state()
    again, info = build_sam("vit_t", random_weights=True)
    assert torch.equal(state, torch.random.get_rng_state())
    assert info == {
        "model_type": "vit_t",
        "backend": "sam",
        "checkpoint_sha256": None,
        "random_weights": True,
        "seed": 0,
    }
    other, _ = build_sam("vit_t", random_weights=True, seed=1)
    weights = sam.state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in weights.items())
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in weights.items())
    assert not sam.training and sam.image_encoder.img_size == 1024
    decoder = sam.mask_decoder
    assert decoder.num_mask_tokens * decoder.transformer_dim == 1024
    # Same parameter names, shapes and seeded draws as MobileSAM's own builder.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = mobile_sam.build_sam_vit_t().state_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ours = SPECS["vit_t"].build().state_dict()
    assert list(ours) == list(reference)
    assert all(torch.equal(v, reference[k]) for k, v in ours.items())


def test_identify_reads_a_tiny_vit_state_dict(sam):
    state = sam.state_dict()
    assert identify(state) == "vit_t"
    fewer = {k: v for k, v in state.items() if not k.startswith("image_encoder.layers.2.blocks.5.")}
    assert identify(fewer) == "an unregistered TinyViT encoder of width 64 and depth 11"


def test_checkpoint_of_the_other_family_is_named(sam, tmp_path):
    path = tmp_path / "mobile_sam.pt"
    torch.save(sam.state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        build_sam("vit_b", checkpoint=path)
    assert f"checkpoint {path} does not fit sam=vit_b (it looks like vit_t" in str(error.value)

    # The encoder keys identify() reads are enough to recognise a vit_b checkpoint.
    vit_b = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    vit_b |= {f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(768) for i in range(12)}
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(vit_b, path)
    with pytest.raises(CheckpointError) as error:
        build_sam("vit_t", checkpoint=path)
    assert f"checkpoint {path} does not fit sam=vit_t (it looks like vit_b" in str(error.value)


def test_loaded_checkpoint_refreshes_tiny_vit_attention_biases(sam, tmp_path):
    """TinyViT caches its attention biases on eval(); a stale cache would ignore the weights."""
    state = {k: v.clone() for k, v in sam.state_dict().items()}
    for key in state:
        if key.endswith("attention_biases"):
            state[key].normal_(generator=torch.Generator().manual_seed(1))
    path = tmp_path / "mobile_sam.pt"
    torch.save(state, path)
    loaded, info = build_sam("vit_t", checkpoint=path)
    assert info["random_weights"] is False and not loaded.training
    attentions = tiny_vit_attentions(loaded)
    assert len(attentions) == 10
    for attention in attentions:
        expected = attention.attention_biases[:, attention.attention_bias_idxs]
        assert expected.abs().sum() > 0 and torch.equal(attention.ab, expected)


def test_the_official_masks(sam):
    image = shapes_image(96, 128, 0)
    settings = AmgSettings(points_per_side=5, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    engine = AutomaticMaskEngine(sam, settings)
    ours = engine.generate(image)
    assert_matches_official(ours, engine, image, min_paired=5)
    assert ours.tokens.shape == (len(ours), 1024) and np.isfinite(ours.tokens).all()


def test_usam_imports_without_mobilesam_and_says_what_to_install():
    script = (
        "import sys; sys.modules['mobile_sam'] = None\n"
        "from usam.sam.registry import build_sam\n"
        "build_sam('tiny')\n"
        "try:\n"
        "    build_sam('vit_t', random_weights=True)\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert "sam=vit_t (MobileSAM) needs" in result.stdout
    assert "pip install mobilesam-mirror timm" in result.stdout
