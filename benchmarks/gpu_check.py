"""usam on a GPU in one command: the exactness contract, mask-engine and Stable Diffusion
speed and peak GPU memory, written to one JSON file (``--out``).

    python benchmarks/gpu_check.py                 # one H100 or H200, under 8 minutes
    python benchmarks/gpu_check.py --device cpu    # the smoke test: tiny models, seconds

* ``contract_fp32`` / ``contract_tf32``: usam's engine against the official generator under
  exact mode's contract (``usam.testing.agreement.compare_with_official``), both sides with
  TF32 off, then on (``allow_tf32`` of ``torch.backends.cuda.matmul`` and of ``cudnn``).
* ``speed_sam1`` / ``speed_sam2``: ms per image of usam's engine and of the official
  generator, every point's best mask kept (``amg.proposals=one_per_point``, usam's
  default), at each ``amg.points_per_batch`` of the sweep, and each side's best; TF32 off.
* ``stable_diffusion``: images per second of usam's ``render`` at full size in fp16.

Each part has a time bound (``PART_SECONDS`` times ``--time-scale``), checked between units
of work (an image, a batch), and records the units it skipped (``cut``, ``skipped``), its
peak GPU memory (``torch.cuda.max_memory_allocated``, reset before it) and any ``error``
(the other parts still run; the exit code is then 1). The weights are random: the file
says so as usam's other outputs do (``usam.core.provenance``); the timings do not depend
on them (one mask per point, a fixed number of denoising steps).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from extract_speed import load_images

import usam
from usam.core.provenance import Provenance, untrained
from usam.core.vocabulary import load_vocabulary
from usam.images.stable_diffusion import GenerateSettings, plan_image, render
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import build_engine, build_sam
from usam.testing.agreement import compare_with_official
from usam.testing.tiny_diffusion import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
# Upper bounds in seconds, together under 8 minutes with the models' building.
PART_SECONDS = {"contract_fp32": 60.0, "contract_tf32": 60.0, "speed_sam1": 100.0,
                "speed_sam2": 100.0, "stable_diffusion": 90.0}  # fmt: skip
SAM1_PARTS = ("contract_fp32", "contract_tf32", "speed_sam1")
# each part's untrained model, for the file's provenance, where it is not SAM ({sam1})
UNTRAINED = {"speed_sam2": "SAM 2.1 ({sam2})", "stable_diffusion": "Stable Diffusion"}
FIRST_VIOLATIONS = 5
NOT_APPLICABLE_ON_CPU = "not applicable: TF32 is a CUDA setting and this run is on the CPU"
NO_GPU = "not applicable: this run is on the CPU"


@dataclass(frozen=True)
class Profile:
    """Models and sizes of one run: real sizes on a GPU, tiny ones for the CPU smoke test."""

    sam1: str
    sam2: str
    points_per_side: int
    points_per_batch: tuple[int, ...]
    images: int
    sd_full_size: bool
    sd_batches: tuple[int, ...]
    sd_steps: int
    sd_pixels: int
    sd_calls: int  # timed calls per batch size


PROFILES = {
    "cuda": Profile(sam1="vit_b", sam2="sam2.1_hiera_t", points_per_side=32,
                    points_per_batch=(32, 64, 128, 256), images=2, sd_full_size=True,
                    sd_batches=(8, 16), sd_steps=20, sd_pixels=512, sd_calls=2),
    "cpu": Profile(sam1="tiny", sam2="sam2.1_tiny", points_per_side=4, points_per_batch=(4, 16),
                   images=1, sd_full_size=False, sd_batches=(2, 4), sd_steps=2, sd_pixels=32,
                   sd_calls=1),
}  # fmt: skip


class PartRun:
    """One part's time bound, the units it skipped once past it, and its peak GPU memory."""

    def __init__(self, seconds: float, device: torch.device) -> None:
        self.device, self.deadline = device, time.perf_counter() + seconds
        self.skipped, self.part_peak = [], 0.0
        self.peak_mb()  # the count starts with the part

    def allows(self, unit: str) -> bool:
        if time.perf_counter() < self.deadline:
            return True
        self.skipped.append(unit)
        return False

    def peak_mb(self) -> float | str:
        """Peak GPU memory since the part began or this was last asked (a row's own)."""
        if self.device.type != "cuda":
            return NO_GPU
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        torch.cuda.reset_peak_memory_stats(self.device)
        self.part_peak = max(self.part_peak, peak)
        return peak

    def part_peak_mb(self) -> float | str:
        return self.part_peak if isinstance(self.peak_mb(), float) else NO_GPU


def run_part(name: str, seconds: float, device: torch.device, work: Callable) -> dict[str, Any]:
    """``work(run)``, run a ``PartRun``; a failure is recorded, with its traceback on
    stderr, so that the other parts still run."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"{name}: up to {seconds:.0f} s", flush=True)
    run, start = PartRun(seconds, device), time.perf_counter()
    try:
        result = work(run)
    except Exception as error:  # recorded in the JSON; the run exits with 1 at the end
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
    seconds_taken = time.perf_counter() - start
    result.update(seconds=seconds_taken, bound_s=seconds, cut=bool(run.skipped),
                  skipped=run.skipped, peak_gpu_mb=run.part_peak_mb())  # fmt: skip
    return result


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_state(device: torch.device) -> dict[str, bool] | str:
    if device.type != "cuda":
        return NOT_APPLICABLE_ON_CPU
    return {"matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_per_point(points_per_side: int, points_per_batch: int = 64) -> AmgSettings:
    """usam's default reading: every grid point's best mask, the filters off."""
    return AmgSettings(proposals="one_per_point", points_per_side=points_per_side,
                       points_per_batch=points_per_batch, pred_iou_thresh=0.0,
                       stability_score_thresh=0.0, box_nms_thresh=1.0)  # fmt: skip


def contract(model_type: str, sam, profile: Profile, images, run: PartRun) -> dict[str, Any]:
    """The contract on each image, under the TF32 setting the caller chose."""
    settings = one_per_point(profile.points_per_side)
    engine = build_engine(model_type, sam, settings)
    reports = []
    for index, image in enumerate(images):
        if run.allows(f"image {index}"):
            ours, official = engine.generate(image), engine.reference_masks(image)
            reports.append(compare_with_official(ours, official, engine, image))
    violations = [v for r in reports for v in r.violations]
    counts = ("official_masks", "our_masks", "paired", "identical_masks", "differing_pixels",
              "pixels_near_threshold", "near_ties")  # fmt: skip
    totals = {name: sum(getattr(r, name) for r in reports) for name in counts}
    return {
        "model": model_type,
        "tf32": tf32_state(run.device),
        "settings": asdict(settings),
        "images_checked": len(reports),
        "holds": all(r.holds for r in reports) if reports else None,
        "violation_count": len(violations),
        "violations": violations[:FIRST_VIOLATIONS],
        **totals,
        "identical_share": totals["identical_masks"] / max(totals["official_masks"], 1),
        "max_iou_pred_diff": max((r.max_iou_pred_diff for r in reports), default=None),
    }


def ms_per_image(work: Callable, images, device: torch.device) -> float:
    start = time.perf_counter()
    for image in images:
        work(image)
    sync(device)
    return (time.perf_counter() - start) * 1000 / len(images)


def speed(model_type: str, sam, profile: Profile, images, run: PartRun) -> dict[str, Any]:
    """Both sides at each ``points_per_batch``, after one untimed image each (CUDA's lazy
    start, kernel selection)."""
    base = one_per_point(profile.points_per_side, profile.points_per_batch[0])
    warm = build_engine(model_type, sam, base)
    start = time.perf_counter()
    warm.generate(images[0])
    warm.reference_masks(images[0])
    warmup = {"seconds": time.perf_counter() - start, "peak_gpu_mb": run.peak_mb()}
    rows = []
    for batch in profile.points_per_batch:
        row: dict[str, Any] = {"points_per_batch": batch}
        engine = build_engine(model_type, sam, replace(base, points_per_batch=batch))
        for side, work in (("usam", engine.generate), ("official", engine.reference_masks)):
            if run.allows(f"points_per_batch={batch} {side}"):
                row[f"{side}_ms_per_image"] = ms_per_image(work, images, run.device)
        row["peak_gpu_mb"] = run.peak_mb()
        rows.append(row)
    return {
        "model": model_type,
        "images": len(images),
        "tf32": tf32_state(run.device),
        "settings": asdict(base) | {"points_per_batch": list(profile.points_per_batch)},
        "warmup": warmup,
        "rows": rows,
        "best": best_batches(rows),
    }


def best_batches(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each side's fastest ``points_per_batch`` and the official/usam ratio of the two."""
    best: dict[str, Any] = {}
    for side in ("usam", "official"):
        key = f"{side}_ms_per_image"
        timed = [row for row in rows if key in row]
        if timed:
            fastest = min(timed, key=lambda row: row[key])
            best[side] = {"points_per_batch": fastest["points_per_batch"], key: fastest[key]}
    if len(best) == 2:
        ratio = best["official"]["official_ms_per_image"] / best["usam"]["usam_ms_per_image"]
        best["official_over_usam"] = ratio
    return best


def full_size_pipeline(device: torch.device):
    """SD v1-4's UNet, VAE and text encoder at full size with seeded random weights, in fp16,
    built on ``device``; the tokenizer (byte-level: CLIP's vocabulary file is a download)
    and the DDIM scheduler (SD's noise schedule) are the tiny pipeline's."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = build_tiny_pipeline()
    tokenizer = tiny.tokenizer  # one token per byte
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        )  # fmt: skip
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
        )  # fmt: skip
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            hidden_size=768, intermediate_size=3072, num_attention_heads=12,
            num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
        ))  # fmt: skip
    full_size = {"unet": unet.half(), "vae": vae.half(), "text_encoder": text_encoder.half()}
    return StableDiffusionPipeline(**(tiny.components | full_size), requires_safety_checker=False)


SD_MODELS = {
    True: "SD v1-4's UNet, VAE and CLIP ViT-L/14 text encoder at full size, random weights, "
    "float16; a byte-level tokenizer, DDIM, no safety checker (usam.testing.tiny_diffusion's)",
    False: "the tiny random-weight pipeline (usam.testing.tiny_diffusion), float32",
}


def stable_diffusion(profile: Profile, run: PartRun) -> dict[str, Any]:
    """Images per second of usam's ``render`` (denoising, VAE decoding, PIL images) at each
    batch size, after one untimed two-step call at the largest."""
    device = run.device
    pipe = full_size_pipeline(device) if profile.sd_full_size else build_tiny_pipeline().to(device)
    pipe.set_progress_bar_config(disable=True)
    size = profile.sd_pixels
    settings = GenerateSettings(steps=profile.sd_steps, height=size, width=size)
    vocabulary = load_vocabulary("voc20")
    plans = [plan_image(vocabulary, 0, i, settings) for i in range(max(profile.sd_batches))]
    start = time.perf_counter()
    render(pipe, plans, replace(settings, steps=min(2, settings.steps)))
    warmup = {"seconds": time.perf_counter() - start, "peak_gpu_mb": run.peak_mb()}
    rows = []
    for batch in profile.sd_batches:
        seconds, calls = 0.0, 0
        for call in range(profile.sd_calls):
            if run.allows(f"batch {batch} call {call}"):
                start = time.perf_counter()
                render(pipe, plans[:batch], settings)
                sync(device)
                seconds, calls = seconds + time.perf_counter() - start, calls + 1
        rate = batch * calls / seconds if calls else None
        rows.append({"batch": batch, "calls": calls, "images_per_second": rate,
                     "peak_gpu_mb": run.peak_mb()})  # fmt: skip
    return {
        "models": SD_MODELS[profile.sd_full_size],
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "pixels": f"{size} x {size}",
        "warmup": warmup,
        "rows": rows,
    }


def git(*args: str) -> str | None:
    """``git``'s output in the repository, None where there is no git or no checkout."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine(device: torch.device) -> dict[str, Any]:
    """What ran the check: the card (or CPU), the library versions and usam's commit."""
    cuda = device.type == "cuda"
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device.type,
        "name": torch.cuda.get_device_name(device) if cuda else "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "usam_version": usam.__version__,
        "usam_commit": git("rev-parse", "HEAD") or "unknown (not a git checkout)",
        "usam_uncommitted_changes": None if status is None else bool(status),
    }


def run_parts(names: list[str], profile: Profile, images, device: torch.device, scale: float):
    """The chosen parts in order, each SAM built once for the parts that use it; TF32 on
    only for ``contract_tf32``."""
    cuda = device.type == "cuda"
    parts: dict[str, Any] = {}

    def part(name: str, work: Callable[[PartRun], dict[str, Any]]) -> None:
        if name in names:
            parts[name] = run_part(name, PART_SECONDS[name] * scale, device, work)

    for model_type, uses in ((profile.sam1, SAM1_PARTS), (profile.sam2, ("speed_sam2",))):
        if not set(uses) & set(names):
            continue
        sam = build_sam(model_type, random_weights=True)[0].to(device)
        for name in (name for name in uses if name in names):
            if name == "contract_tf32" and not cuda:
                parts[name] = {"not_applicable": NOT_APPLICABLE_ON_CPU}
                continue
            if cuda:
                set_tf32(name == "contract_tf32")
            task = contract if name.startswith("contract") else speed
            part(name, partial(task, model_type, sam, profile, images))
        del sam
    part("stable_diffusion", partial(stable_diffusion, profile))
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(PROFILES), default="cuda")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--time-scale", type=float, default=1.0, help="scales every part's bound")
    parser.add_argument("--parts", nargs="+", choices=list(PART_SECONDS),
                        default=list(PART_SECONDS))  # fmt: skip
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no CUDA device here; --device cpu runs the smoke test")
    device, profile = torch.device(args.device), PROFILES[args.device]
    start = time.perf_counter()
    images, source = load_images(profile.images)
    parts = run_parts(args.parts, profile, images, device, args.time_scale)
    models = (UNTRAINED.get(name, "SAM ({sam1})").format(**asdict(profile)) for name in parts)
    provenance = Provenance.of(untrained(model) for model in models)
    report = {
        "check": "benchmarks/gpu_check.py",
        "random_weights": True,
        **provenance.fields(),
        "note": provenance.banner(
            "the masks and images are noise and NOT results; the timings, memory peaks and "
            "the contract check measure usam itself, as they would with trained weights"
        ),
        "machine": machine(device),
        "profile": asdict(profile),
        "sam_images": f"{len(images)} {source}",
        "total_seconds": time.perf_counter() - start,
        "parts": parts,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(report["note"])
    print(f"wrote {args.out} in {report['total_seconds']:.0f} s")
    return 1 if any("error" in part for part in parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
