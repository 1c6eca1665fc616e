"""Points in batches: at its GPU settings (``amg.tuned_for=gpu``) every backend decodes and
finishes ``points_per_batch`` points at once, and the exactness contract holds at every
batch size; full-resolution masks are finished in groups bounded by a pixel budget."""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from usam.core.config import ConfigError, settings_from_config
from usam.sam import image_encoder
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import build_engine, build_sam
from usam.testing.agreement import compare_with_official, point_ious

from helpers.official_amg import official, shapes_image

BATCH_SIZES = (1, 7, 64)
# per backend: the package it needs, the grid, the stability threshold and box NMS
BACKENDS = {
    "tiny": (None, 8, 0.05, 0.7),
    "vit_t": ("mobile_sam", 5, 0.0, 0.7),
    "hq_tiny": ("segment_anything_hq", 6, 0.5, 0.98),
    "sam2.1_tiny": ("sam2", 4, 0.3, 0.95),
}


@dataclass
class Backend:
    """A backend's random model with the settings its contract test uses, and the official
    generator's masks with them at its default batch of 64 (the official batch size only
    changes the official rounding, which the contract allows for)."""

    model: torch.nn.Module
    settings: AmgSettings
    image: np.ndarray
    official: list[dict]


@pytest.fixture(scope="module")
def backends():
    """Each backend built once, its IoU filter at the median predicted IoU, so that some
    points keep every output, some a few, some none."""
    built = {}

    def get(model_type: str) -> Backend:
        if model_type not in built:
            package, side, stability, box_nms = BACKENDS[model_type]
            if package is not None and find_spec(package) is None:
                pytest.skip(f"sam={model_type} needs {package}")
            model = build_sam(model_type, random_weights=True)[0]
            image = shapes_image(96, 128, 0)
            probe = build_engine(model_type, model, AmgSettings(points_per_side=side))
            settings = AmgSettings(
                points_per_side=side,
                pred_iou_thresh=float(np.median(point_ious(probe, image))),
                stability_score_thresh=stability,
                box_nms_thresh=box_nms,
                tuned_for="gpu",
            )
            reference = official(build_engine(model_type, model, settings), image)
            built[model_type] = Backend(model, settings, image, reference)
        return built[model_type]

    return get


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("model_type", list(BACKENDS))
def test_the_contract_holds_at_every_batch_size_on_the_gpu_path(backends, model_type, batch):
    backend = backends(model_type)
    settings = replace(backend.settings, points_per_batch=batch)
    engine = build_engine(model_type, backend.model, settings)
    assert engine.tuning == "gpu" and engine.points_per_pass == batch
    ours = engine.generate(backend.image)
    report = compare_with_official(ours, backend.official, engine, backend.image)
    assert report.holds, "\n".join(report.violations[:20])
    assert report.paired >= len(backend.official) - report.near_ties
    assert report.paired >= max(3, len(ours) - report.near_ties)
    assert ours.tokens.shape == (len(ours), 1024) and np.isfinite(ours.tokens).all()


def test_one_pass_per_batch_on_the_gpu_path_and_one_per_point_on_the_cpu_path(backends):
    tiny = backends("tiny")
    model, settings, image = tiny.model, tiny.settings, tiny.image
    points = np.array([[10.0, 20.0], [60.0, 40.0], [100.0, 80.0]])
    passes = {}
    for tuned_for in ("gpu", "cpu"):
        engine = build_engine("tiny", model, replace(settings, tuned_for=tuned_for))
        with torch.inference_mode():
            engine.set_image(image)
            decoded = engine.decode(points, image.shape[:2])
            passes[tuned_for] = [len(keys) for keys in decoded.image_keys]
            low_res = decoded.low_res_masks(torch.tensor([0, 2]))
        assert low_res.shape == (2, 3, 64, 64)
        passes[tuned_for + " logits"] = low_res
    assert passes["gpu"] == [3] and passes["cpu"] == [1, 1, 1]
    bound = 1e-4 * passes["cpu logits"].abs().max().item()
    torch.testing.assert_close(passes["gpu logits"], passes["cpu logits"], rtol=0, atol=bound)


def test_the_vit_encoder_runs_in_pieces_on_the_cpu_path_only(backends, monkeypatch):
    tiny = backends("tiny")
    model, settings, image = tiny.model, tiny.settings, tiny.image
    calls = []
    in_pieces = image_encoder.encode_vit
    monkeypatch.setattr(
        image_encoder, "encode_vit", lambda *args: calls.append(1) or in_pieces(*args)
    )
    for tuned_for, expected in (("gpu", 0), ("cpu", 1), ("auto", 2)):  # auto: a CPU model
        engine = build_engine("tiny", model, replace(settings, tuned_for=tuned_for))
        with torch.inference_mode():
            engine.set_image(image)
        assert len(calls) == expected, tuned_for


def test_an_unknown_tuning_is_named():
    with pytest.raises(ConfigError, match=r"amg.tuned_for='tpu' is not one of auto, cpu, gpu"):
        settings_from_config(AmgSettings, {"tuned_for": "tpu"}, "amg")


def decoded_masks(masks) -> list[np.ndarray]:
    size = [masks.height, masks.width]
    return [mask_utils.decode({"size": size, "counts": counts}) for counts in masks.rles]


@pytest.mark.parametrize("tuned_for", ["gpu", "cpu"])
def test_full_resolution_masks_are_finished_within_the_pixel_budget(tuned_for):
    """A 3 MP photo, every mask kept: groups of as many masks as the budget holds (5 here,
    not 2), never more pixels at once, and the masks those of one group per batch."""
    model = build_sam("tiny")[0]
    image = np.kron(shapes_image(150, 200, 3), np.ones((10, 10, 1), np.uint8))  # 1500 x 2000
    pixels = image.shape[0] * image.shape[1]
    settings = AmgSettings(
        points_per_side=3,
        points_per_batch=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        tuned_for=tuned_for,
    )
    engine = build_engine("tiny", model, settings)
    engine.pixel_budget = 5 * pixels + pixels // 2
    groups, upsample = [], engine.upsample

    def counted(low_res):
        logits = upsample(low_res)
        assert logits.shape[1:] == image.shape[:2]
        groups.append(len(logits))
        return logits

    engine.upsample = counted
    ours = engine.generate(image)
    assert groups == [5, 5, 2, 5, 5, 2, 3]  # batches of 4, 4 and 1 points, 3 masks each
    assert max(groups) * pixels <= engine.pixel_budget
    engine.pixel_budget = 27 * pixels  # every batch in one group
    whole = engine.generate(image)
    assert len(ours) == len(whole) == 27
    np.testing.assert_array_equal(ours.points, whole.points)
    for a, b in zip(decoded_masks(ours), decoded_masks(whole)):
        assert (a != b).mean() <= 1e-5
