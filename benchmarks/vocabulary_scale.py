"""The head and evaluation at three vocabulary sizes: VOC's 21 outputs, COCO's 81 and an
LVIS-sized 1,204 (1,203 classes and background), on synthetic data.

Each size and part runs in a fresh process, so that its peak resident memory is its own.
Printed per number of outputs:

- **train**: the teacher's step (forward, MIL loss, backward, Adam) on a batch of
  ``--batch-size`` images of ``--masks`` masks of 1,024-d tokens (1,024 masks: the paper's
  32 x 32 points), batched as the DataModule batches them: ms per step (median of
  ``--steps`` after one warm-up step) and the peak resident memory it adds;
- **eval**: what ``usam.evaluation.scoring`` does per image (head probabilities,
  threshold and NMS, decoding the masks, the semantic map, the metric collection's
  update) on ``--eval-images`` images of ``--masks`` masks at ``--height`` x ``--width``
  (VOC's photo size), every mask a candidate (threshold 0): ms per image, the peak
  resident memory it adds, and the seconds of the metrics' ``compute`` (COCOeval runs
  over images x classes).

Embeddings are random and the masks random boxes (``usam.testing.synthetic``), so only
time and memory mean anything; the head is the default MLP.

    python benchmarks/vocabulary_scale.py
    python benchmarks/vocabulary_scale.py --masks 256 --eval-images 4 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from usam.data.datamodule import collate_records
from usam.data.ground_truth import GroundTruth, Instance, paint_instances
from usam.evaluation.metrics import metric_collection
from usam.formats.embedding_shards import ImageRecord, encode_mask
from usam.inference.predictor import InferenceSettings, Predictor, load_head, select_instances
from usam.inference.semantic_map import semantic_from_instances
from usam.testing.synthetic import make_record, numbered_classes, prototypes
from usam.train.lightning_modules import TeacherModule

OUTPUTS = (21, 81, 1204)
EMBED_DIM = 1024


def rss_mib() -> float:
    """This process's resident memory now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_batch(num_classes: int, images: int, masks: int) -> dict:
    """A batch as the DataModule collates one: synthetic records of ``masks`` masks each."""
    class_protos, background = prototypes(num_classes, EMBED_DIM, seed=0)
    rng = np.random.default_rng(0)
    records = [
        make_record(
            f"image{i}",
            [i % num_classes],
            num_classes,
            class_protos,
            background,
            rng,
            (masks, masks),
            0.3,
            1.0,
        )[0]
        for i in range(images)
    ]
    return collate_records(records)


def train_part(outputs: int, args: argparse.Namespace) -> dict:
    classes = numbered_classes(outputs - 1)
    batch = training_batch(len(classes), args.batch_size, args.masks)
    module = TeacherModule(classes, sam_model_type="tiny")
    optimizer = module.configure_optimizers()
    before = rss_mib()
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        _, loss = module.mil_terms(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "train_ms": 1000 * statistics.median(times[1:]),
        "train_peak_mib": peak_rss_mib() - before,
        "head_parameters": sum(p.numel() for p in module.head.parameters()),
    }


def head_predictor(classes: list[str], folder: Path) -> Predictor:
    """A random head saved and loaded as a checkpoint, as usam.eval loads one."""
    module = TeacherModule(classes, sam_model_type="tiny")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(folder / "head.ckpt")
    settings = InferenceSettings(confidence_threshold=0.0)
    return Predictor(load_head(folder / "head.ckpt"), settings, device="cpu")


def box_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    y0, x0 = rng.integers(0, height - 8), rng.integers(0, width - 8)
    mask[y0 : y0 + rng.integers(4, height - y0), x0 : x0 + rng.integers(4, width - x0)] = True
    return mask


def eval_image(index: int, num_classes: int, args: argparse.Namespace):
    """A record of random box masks at the photo size, and ground truth of five of them;
    masks are made one at a time, so that making them sets no memory peak."""
    rng = np.random.default_rng(index)
    shape = (args.height, args.width)
    truths = [box_mask(rng, *shape) for _ in range(5)]
    rles = [encode_mask(m)["counts"] for m in truths]
    rles += [encode_mask(box_mask(rng, *shape))["counts"] for _ in range(args.masks - 5)]
    boxes = np.zeros((args.masks, 4), np.float32)
    record = ImageRecord(
        key=f"image{index}",
        height=args.height,
        width=args.width,
        embeddings=rng.standard_normal((args.masks, EMBED_DIM)).astype(np.float16),
        iou_preds=rng.uniform(0.9, 1.0, args.masks),
        stability=rng.uniform(0.95, 1.0, args.masks),
        boxes=boxes,
        points=boxes[:, :2],
        multimask=rng.integers(0, 3, args.masks),
        rles=rles,
    )
    instances = [Instance(m, int(rng.integers(num_classes))) for m in truths]
    truth = GroundTruth(paint_instances(instances, shape, num_classes), instances)
    return record, truth


def eval_part(outputs: int, args: argparse.Namespace) -> dict:
    classes = numbered_classes(outputs - 1)
    images = [eval_image(i, len(classes), args) for i in range(args.eval_images)]
    with tempfile.TemporaryDirectory() as folder:
        predictor = head_predictor(classes, Path(folder))
    metrics = metric_collection(classes, sync_on_compute=False)
    before = rss_mib()
    start = time.perf_counter()
    for record, truth in images:
        prediction = select_instances(
            record, predictor.mask_probabilities(record), predictor.settings
        )
        kept = record.masks()[prediction.mask_indices]
        shape = (record.height, record.width)
        semantic = semantic_from_instances(kept, prediction.labels, prediction.scores, shape)
        metrics.update(
            semantic=semantic,
            masks=kept,
            labels=prediction.labels,
            scores=prediction.scores,
            truth=truth,
        )
    per_image = (time.perf_counter() - start) / len(images)
    start = time.perf_counter()
    metrics.compute()
    return {
        "eval_ms_per_image": 1000 * per_image,
        "eval_peak_mib": peak_rss_mib() - before,
        "compute_s": time.perf_counter() - start,
    }


def run_child(outputs: int, part: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", str(outputs), part, *args.passed]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{outputs} outputs, {part}: failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--masks", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--outputs", type=int, nargs="+", default=list(OUTPUTS))
    parser.add_argument("--child", nargs=2, metavar=("OUTPUTS", "PART"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.passed = list(argv if argv is not None else sys.argv[1:])
    if args.child:  # the child gets the parent's options, not its --child
        at = args.passed.index("--child")
        args.passed = args.passed[:at] + args.passed[at + 3 :]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)
    if args.child:
        outputs, part = int(args.child[0]), args.child[1]
        result = train_part(outputs, args) if part == "train" else eval_part(outputs, args)
        print(json.dumps(result))
        return
    print(
        f"head step: batch {args.batch_size} x {args.masks} masks x {EMBED_DIM}-d; evaluation: "
        f"{args.eval_images} images of {args.masks} masks at {args.width} x {args.height}, "
        "one thread, synthetic data (time and memory only)"
    )
    header = (
        "| outputs | head parameters | train ms/step | train peak MiB | eval ms/image "
        "| eval peak MiB | metrics compute s |"
    )
    print(header)
    print("| --- " * 7 + "|")
    for outputs in args.outputs:
        row = run_child(outputs, "train", args) | run_child(outputs, "eval", args)
        print(
            f"| {outputs:,} | {row['head_parameters']:,} | {row['train_ms']:.1f} "
            f"| {row['train_peak_mib']:.0f} | {row['eval_ms_per_image']:.0f} "
            f"| {row['eval_peak_mib']:.0f} | {row['compute_s']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
