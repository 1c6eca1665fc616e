"""Each backend's official automatic mask generator against usam's engine: one image set.

For SAM 1 models (``--model vit_b``, ``vit_t``, ...) the official one is
``segment_anything.SamAutomaticMaskGenerator``; for SAM 2.1 (``--model sam2.1_hiera_t``)
``sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator``; for HQ-SAM (``--model
hq_vit_b``, ...) ``segment_anything_hq.SamAutomaticMaskGenerator``.

Both run in this process with the same settings, at predicted-IoU thresholds chosen from
a first pass so that about 100%, 50% and 10% of the masks pass the IoU filter. Printed
per pass rate: images/s of each, their ratio (also without each one's image encoder), peak
extra resident memory during each, whether our output meets exact mode's contract
(``usam.testing.agreement.compare_with_official``: the official computation up to float32
rounding), the share of masks bit-identical to the official ones and the largest
predicted-IoU difference. A second table splits our
seconds per image into encoder, decoder and post-processing and sets the total against
the FLOP floor: the model's FLOPs at this machine's measured fp32 matmul throughput.
FLOPs are counted by torch (``FlopCounterMode``) on each side: the official predictor's
encoder and decoder per point (transformer and upscaling, every point upscaled), and
usam's; usam's decoder reassociates its products within the contract
(``usam.sam.decoder_attention``), so it does fewer.

With ``--proposals one_per_point`` (the paper's reading, usam's default) every grid point
keeps its best mask with the filters off, so every mask is upsampled and encoded; the
official side is then the official generator with its filters off followed by each
point's best record (``PointGridEngine.reference_masks``), and the shard bytes per image
are printed beside the row.

Random weights make near-identical masks that box NMS at the default 0.7 collapses to one
or two per image; ``--box-nms-thresh 1`` keeps them all, for an agreement measured on
hundreds of masks.

Without ``--checkpoint`` the model has seeded random weights (usam.sam.registry): the
masks mean nothing, but the work done, and so the timing, is the same as with trained
weights at the same pass rates.

    python benchmarks/extract_speed.py --model vit_b --points-per-side 16 --images 1
    python benchmarks/extract_speed.py --model tiny --points-per-side 16 --images 2
    python benchmarks/extract_speed.py --model sam2.1_hiera_t --points-per-side 16 --images 1
    python benchmarks/extract_speed.py --model hq_vit_b --points-per-side 16 --images 1
    python benchmarks/extract_speed.py --model vit_b --pass-rates 1 --box-nms-thresh 1
    python benchmarks/extract_speed.py --model vit_b --points-per-side 32 --proposals one_per_point
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from usam.formats.embedding_shards import encode_record
from usam.sam.amg_settings import AmgSettings
from usam.sam.mask_engine import PointGridEngine
from usam.sam.registry import build_engine, build_sam
from usam.testing.agreement import compare_with_official, point_ious

VOC_IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "voc2012-mini"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def load_images(count: int) -> tuple[list[np.ndarray], str]:
    folder = VOC_IMAGES / "JPEGImages"
    if folder.is_dir():
        paths = sorted(folder.glob("*.jpg"))[:count]
        return [np.array(Image.open(p).convert("RGB")) for p in paths], "VOC2012 photos"
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        image = np.empty((375, 500, 3), np.uint8)
        image[:] = rng.integers(0, 256, 3)
        yy, xx = np.mgrid[:375, :500]
        for _ in range(8):
            cy, cx, r = rng.integers(0, 375), rng.integers(0, 500), rng.integers(30, 120)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        images.append(image)
    return images, "synthetic shapes (no ../shared/data here)"


class PeakRss:
    """Peak resident memory above the level at entry, sampled every few milliseconds."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE


def timed(generate, images):
    """Outputs, total seconds and peak extra memory of ``generate`` over ``images``."""
    outputs, seconds, peak = [], 0.0, 0.0
    for image in images:
        with PeakRss() as memory:
            start = time.perf_counter()
            outputs.append(generate(image))
            seconds += time.perf_counter() - start
        peak = max(peak, memory.extra_mb)
    return outputs, seconds, peak


def run_official(engine: PointGridEngine, images):
    return timed(engine.reference_masks, images)


def shard_megabytes(masks) -> float:
    """Bytes one image takes in an embedding shard (its .npy and .json entries), in MB."""
    sample = encode_record(masks.to_record("image"), masks.tokens.shape[1])
    return sum(len(v) for k, v in sample.items() if k != "__key__") / 2**20


def run_ours(engine: PointGridEngine, images):
    """Like ``run_official``, plus the engine's mean seconds per image by stage."""
    stages: list[dict[str, float]] = []

    def generate(image):
        masks = engine.generate(image)
        stages.append(engine.stage_seconds)
        return masks

    outputs, seconds, peak = timed(generate, images)
    return outputs, seconds, peak, {k: sum(s[k] for s in stages) / len(stages) for k in stages[0]}


def official_agreement(engine: PointGridEngine, images, official, ours) -> dict[str, object]:
    """Exact mode's contract over the images: mask counts, whether it holds, the share of
    bit-identical masks and the largest predicted-IoU difference.
    """
    reports = [
        compare_with_official(o, theirs, engine, image)
        for image, theirs, o in zip(images, official, ours)
    ]
    n_official = sum(r.official_masks for r in reports)
    return {
        "masks": f"{n_official}/{sum(r.our_masks for r in reports)}",
        "contract": all(r.holds for r in reports),
        "identical": sum(r.identical_masks for r in reports) / max(n_official, 1),
        "max_diou": max((r.max_iou_pred_diff for r in reports), default=0.0),
    }


def official_encoder_seconds(engine: PointGridEngine, images) -> float:
    """Seconds per image of the official predictor's ``set_image``."""
    start = time.perf_counter()
    for image in images:
        engine.official_point_logits(image)
    return (time.perf_counter() - start) / len(images)


def matmul_flops_per_second(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul throughput (best of ``repeats``), the floor's denominator."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _flops(work) -> float:
    # inference mode: FlopCounterMode's module hooks trip over the decoder's no_grad outputs
    with torch.inference_mode(), FlopCounterMode(display=False, depth=None) as counter:
        work()
    return float(counter.get_total_flops())


def model_flops(engine: PointGridEngine, image: np.ndarray) -> dict[str, tuple[float, float]]:
    """(encoder FLOPs per image, mask-decoder FLOPs per point prompt, every point's masks
    upscaled) of the official predictor and of usam's engine, counted by torch."""
    points = np.random.default_rng(0).random((8, 2)) * image.shape[1::-1]
    logits_of = []
    official_encoder = _flops(lambda: logits_of.append(engine.official_point_logits(image)))
    official_decoder = _flops(lambda: logits_of[0](points[0]))
    encoder = _flops(lambda: engine.set_image(image))

    def decode() -> None:
        engine.decode(points, image.shape[:2]).low_res_masks(torch.arange(len(points)))

    decoder = _flops(decode) / len(points)
    engine.reset_image()
    return {"official": (official_encoder, official_decoder), "usam": (encoder, decoder)}


def floor_seconds(engine: PointGridEngine, images, marker: str) -> float:
    """Seconds per image usam's arithmetic alone needs at this machine's matmul speed;
    prints both sides' FLOPs."""
    throughput = matmul_flops_per_second()
    flops = model_flops(engine, images[0])
    prompts = engine.settings.points_per_side**2
    for side, (encoder, decoder) in flops.items():
        print(
            f"FLOPs {side}: encoder {encoder / 1e9:.1f} GFLOP/image, decoder "
            f"{decoder / 1e9:.3f} GFLOP/point"
        )
    encoder_flops, point_flops = flops["usam"]
    floor = (encoder_flops + point_flops * prompts) / throughput
    print(
        f"FLOP floor: usam's FLOPs for {prompts} points at {throughput / 1e9:.0f} GFLOP/s "
        f"matmul -> {floor:.2f} s/image{marker}"
    )
    return floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="vit_b",
        help="a sam model type: vit_h|l|b|t, tiny, sam2.1_hiera_t|s|b+|l, sam2.1_tiny, "
        "hq_vit_b|l|h|tiny, hq_tiny",
    )
    parser.add_argument("--checkpoint", help="trained weights; seeded random weights without")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--stability-thresh", type=float, default=0.95)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7)
    parser.add_argument(
        "--proposals",
        choices=["filtered", "one_per_point"],
        default="filtered",
        help="one_per_point: every point's best mask, filters off (one pass rate: 100%%)",
    )
    parser.add_argument("--pass-rates", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sam, info = build_sam(
        args.model, args.checkpoint, random_weights=args.checkpoint is None, seed=args.seed
    )
    images, source = load_images(args.images)
    base = AmgSettings(
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        stability_score_thresh=args.stability_thresh,
        box_nms_thresh=args.box_nms_thresh,
    )
    if args.proposals == "one_per_point":
        base = replace(
            base,
            proposals="one_per_point",
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            box_nms_thresh=1.0,
        )
        args.pass_rates = [1.0]
    probe = build_engine(args.model, sam, base)
    ious = np.concatenate([point_ious(probe, image) for image in images])
    print(
        f"model={args.model} random_weights={info['random_weights']} images={len(images)} "
        f"({source}) points_per_side={args.points_per_side} "
        f"points_per_batch={args.points_per_batch} stability_thresh={base.stability_score_thresh} "
        f"box_nms_thresh={base.box_nms_thresh} proposals={base.proposals} "
        f"torch_threads={torch.get_num_threads()}"
    )
    if info["random_weights"]:
        print("RANDOM WEIGHTS: the masks mean nothing; the timings and the agreement still hold")
    marker = " [random weights]" if info["random_weights"] else ""
    floor = floor_seconds(probe, images, marker)
    official_encoder = official_encoder_seconds(probe, images)
    print(f"official image encoder alone: {official_encoder:.2f} s/image{marker}")
    header = (
        f"{'pass':>5} {'iou_thr':>8} {'official img/s':>14} {'ours img/s':>10} {'ratio':>6} "
        f"{'ratio w/o enc':>13} {'official MB':>11} {'ours MB':>8} {'masks':>11} {'contract':>8} "
        f"{'identical':>9} {'max dIoU':>9}"
    )
    stage_rows = []
    print(f"official generator against ours{marker}")
    print(header)
    for rate in args.pass_rates:
        threshold = 0.0 if rate >= 1.0 else float(np.quantile(ious, 1.0 - rate))
        passed = float(np.mean(ious > threshold)) if threshold > 0 else 1.0
        settings = replace(base, pred_iou_thresh=threshold)
        engine = build_engine(args.model, sam, settings)
        official, t_official, m_official = run_official(engine, images)
        ours, t_ours, m_ours, stages = run_ours(engine, images)
        agree = official_agreement(engine, images, official, ours)
        n = len(images)
        without = (t_official / n - official_encoder) / max(t_ours / n - stages["encoder"], 1e-9)
        print(
            f"{passed:>5.0%} {threshold:>8.4f} {n / t_official:>14.4f} "
            f"{n / t_ours:>10.4f} {t_official / t_ours:>6.2f} {without:>13.2f} "
            f"{m_official:>11.0f} {m_ours:>8.0f} {agree['masks']:>11} {str(agree['contract']):>8} "
            f"{agree['identical']:>9.1%} {agree['max_diou']:>9.2e}"
        )
        stage_rows.append((passed, stages))
        size = np.mean([shard_megabytes(o) for o in ours])
        print(f"{'':>5} shard size: {size:.2f} MB/image{marker}")
    print_stages(stage_rows, floor, marker)


def print_stages(rows, floor: float, marker: str) -> None:
    """Our seconds per image by stage, and the total against the FLOP floor."""
    print(f"ours by stage, s/image{marker}")
    print("(decoder: the mask decoder and its upscaling; post: the rest)")
    print(f"{'pass':>5} {'encoder':>8} {'decoder':>8} {'post':>8} {'total':>8} {'x floor':>8}")
    for passed, stages in rows:
        total = sum(stages.values())
        print(
            f"{passed:>5.0%} {stages['encoder']:>8.2f} {stages['decoder']:>8.2f} "
            f"{stages['post-processing']:>8.2f} {total:>8.2f} {total / floor:>8.2f}"
        )


if __name__ == "__main__":
    main()
