"""The SAM registry: official specs, the seeded tiny model, and checkpoint loading through it."""

from __future__ import annotations

import re
import sys
from importlib import import_module

import pytest
import torch

from usam.sam import checkpoints, registry
from usam.sam.checkpoints import CheckpointError
from usam.sam.registry import SPECS, SamSettings, build_sam
from usam.sam.sam1_backend import MobileSamMissing


def test_official_specs_name_their_checkpoints():
    for model_type in ("vit_h", "vit_l", "vit_b"):
        spec = SPECS[model_type]
        assert not spec.random_weights
        assert spec.checkpoint_name.startswith(f"sam_{model_type}_")
        assert spec.url.endswith("/segment_anything/" + spec.checkpoint_name)
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
    assert SPECS["tiny"].random_weights and SPECS["tiny"].url is None


def test_unknown_model_type():
    with pytest.raises(ValueError, match="unknown SAM model type 'vit_x'.*tiny"):
        build_sam("vit_x")


def test_tiny_is_seeded_marked_random_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    model, info = build_sam("tiny")
    assert torch.equal(state, torch.random.get_rng_state())
    assert info == {
        "model_type": "tiny",
        "backend": "sam",
        "checkpoint_sha256": None,
        "random_weights": True,
        "seed": 0,
    }
    again, _ = build_sam("tiny")
    other, _ = build_sam("tiny", seed=1)
    weights = model.state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in weights.items())
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in weights.items())
    decoder = model.mask_decoder
    assert decoder.num_mask_tokens * decoder.transformer_dim == 1024
    assert not model.training


def test_random_official_architecture_needs_no_checkpoint():
    model, info = build_sam("vit_b", random_weights=True, seed=3)
    assert info["random_weights"] and info["model_type"] == "vit_b" and info["seed"] == 3
    assert model.image_encoder.patch_embed.proj.weight.shape[0] == 768


def test_checkpoint_round_trip_records_its_sha256(tmp_path):
    model, _ = build_sam("tiny", seed=5)
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    loaded, info = build_sam("tiny", checkpoint=path)
    assert info["random_weights"] is False
    assert info["checkpoint_sha256"] == checkpoints.sha256_of(path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_checkpoint_of_another_model_type_is_named(tmp_path):
    model, _ = build_sam("tiny")
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    assert registry.identify(model.state_dict()) == "tiny"
    with pytest.raises(CheckpointError) as error:
        build_sam("vit_b", checkpoint=path)
    message = str(error.value)
    assert f"checkpoint {path} does not fit sam=vit_b (it looks like tiny" in message
    assert "Traceback" not in message


def test_missing_official_checkpoint_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("USAM_CACHE", str(tmp_path))
    monkeypatch.setenv("USAM_OFFLINE", "1")
    with pytest.raises(CheckpointError) as error:
        build_sam("vit_b")
    message = str(error.value)
    assert "sam_vit_b_01ec64.pth" in message
    assert SPECS["vit_b"].url in message
    assert "sam.checkpoint=/path/to/sam_vit_b_01ec64.pth" in message


def test_the_registry_is_the_backend_modules_declarations_merged():
    """A backend declares its models in its own module; the registry adds none of its own."""
    declared = [spec for name in registry.BACKEND_MODULES for spec in import_module(name).SPECS]
    assert {spec.model_type: spec for spec in declared} == SPECS
    assert len(declared) == len(SPECS)
    assert {spec.backend for spec in declared} >= {"sam", "sam2"}


def test_a_model_type_declared_twice_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "BACKEND_MODULES", ("usam.sam.sam1_backend",) * 2)
    with pytest.raises(ValueError, match="'vit_h' is declared twice"):
        registry._merged_specs()


def test_each_family_reads_only_its_own_state_dicts():
    """SAM 1's reader declines a state dict whose decoder has parts SAM 1's lacks."""
    state = build_sam("tiny")[0].state_dict()
    assert SPECS["tiny"].read_encoder(state) == ("ViT", 64, 2)
    state["mask_decoder.extra_token.weight"] = torch.zeros(1, 256)
    assert SPECS["tiny"].read_encoder(state) is None
    assert registry.identify(state) is None


def test_mobilesam_names_its_install_line_when_the_sam_group_is_read(monkeypatch):
    monkeypatch.setitem(sys.modules, "mobile_sam.modeling", None)  # import fails
    with pytest.raises(MobileSamMissing, match="sam=vit_t .*pip install mobilesam-mirror timm"):
        SamSettings("vit_t").check()
