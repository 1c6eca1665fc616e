"""What one turn of the review loop does to a head: a reviewer, simulated from the ground
truth, labels ``--reviewed`` images; the head is fine-tuned on them
(``usam.review.finetune``, its defaults: each SAM proposal takes the class of the reviewed
region it overlaps at mask IoU >= 0.5, else background); mIoU and mAP50 on the other
images are measured before and after, with the evaluation of ``usam.eval``.

Two sets, each printed as one row:

- **synthetic** (always): an evaluation set of synthetic embedding shards
  (``usam.testing.synthetic``) whose class masks carry tokens near one prototype per class,
  so the classes are learnable by construction. The head starts untrained. The gain must
  be clear; the set is synthetic, so the figures are no result either.
- **voc** (``--voc DIR``, the VOC2012 folder of a VOCdevkit, e.g. VOC-mini's): the val
  images' proposals from the tiny random SAM and an untrained head. The reviewer's
  regions are VOC's class masks cut into connected components (VOC-mini has no instance
  masks). Random weights everywhere: the row shows that the loop runs on real photos
  and their ground truth, not what it achieves.

The reviewed images are ``--reviewed`` drawn at random (seeded); the rest are scored.

    python benchmarks/review_loop.py
    python benchmarks/review_loop.py --voc ../shared/data/voc2012-mini
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
import numpy as np

from usam.data.eval_datasets import VOCSegmentation, load_ground_truth
from usam.data.extraction import extract
from usam.evaluation.scoring import evaluate
from usam.formats.embedding_shards import ImageRecord, ShardSetWriter, iter_records, read_manifest
from usam.inference.predictor import InferenceSettings, Predictor, load_head
from usam.review.finetune import FineTuneSettings, finetune_head, proposal_targets
from usam.review.reviewed import Review, ReviewedImage
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import build_engine, build_sam
from usam.testing.synthetic import numbered_classes, write_synthetic_eval_set
from usam.train.lightning_modules import TeacherModule

# the random tiny SAM gives a few dozen masks per photo only with its filters open
TINY_AMG = AmgSettings(
    points_per_side=16, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.95
)


def reviewer(records: list[ImageRecord], classes: list[str], source: str) -> Review:
    """What a reviewer who draws the ground truth would submit: one region per instance."""
    images = []
    for record in records:
        truth = load_ground_truth(record.ground_truth)
        kept = [instance for instance in truth.instances if not instance.iscrowd]
        masks = np.zeros((len(kept), record.height, record.width), bool)
        for index, instance in enumerate(kept):
            masks[index] = instance.mask
        labels = np.array([instance.label for instance in kept], dtype=np.int64)
        images.append(ReviewedImage(record.key, record.height, record.width, masks, labels))
    return Review(source, tuple(classes), tuple(images))


def split(eval_dir: Path, reviewed: int, folder: Path) -> tuple[list[ImageRecord], Path]:
    """``reviewed`` records drawn at random (seeded), and a shard set of the rest to score."""
    manifest = read_manifest(eval_dir)
    records = sorted(iter_records(eval_dir), key=lambda record: record.key)
    if len(records) <= reviewed:
        raise SystemExit(f"{eval_dir} holds {len(records)} images: none left to score")
    chosen = set(np.random.default_rng(0).permutation(len(records))[:reviewed].tolist())
    manifest.shards = []
    with ShardSetWriter(folder / "held_out", manifest, images_per_shard=64) as writer:
        for index, record in enumerate(records):
            if index not in chosen:
                writer.write(record)
    return [records[i] for i in sorted(chosen)], folder / "held_out"


def untrained_head(classes: list[str], embed_dim: int, sam: str, folder: Path) -> Path:
    """An untrained head saved as ``usam.fit`` saves one, seeded."""
    L.seed_everything(0, verbose=False)
    module = TeacherModule(classes, embed_dim=embed_dim, sam_model_type=sam)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(folder / "head.ckpt")
    return folder / "head.ckpt"


def loop_turn(name: str, eval_dir: Path, args: argparse.Namespace, folder: Path) -> dict:
    """Before and after one fine-tune on ``args.reviewed`` simulated reviews."""
    manifest = read_manifest(eval_dir)
    classes = list(manifest.classes)
    reviewed, held_out = split(eval_dir, args.reviewed, folder)
    review = reviewer(reviewed, classes, f"ground truth of {len(reviewed)} {name} images")
    start = load_head(
        untrained_head(classes, manifest.embed_dim, manifest.sam["model_type"], folder)
    )
    settings = FineTuneSettings(max_epochs=args.epochs)
    records = {record.key: record for record in reviewed}
    tuned = load_head(finetune_head(start, review, records, settings, folder / "finetune"))
    inference = InferenceSettings(confidence_threshold=args.threshold)
    before = evaluate(held_out, Predictor(start, inference, "cpu"))
    after = evaluate(held_out, Predictor(tuned, inference, "cpu"))
    matched = sum(
        int((proposal_targets(records[image.file_name], image, settings.match_iou) > 0).sum())
        for image in review.images
    )
    return {
        "set": name,
        "reviewed": len(review.images),
        "regions": review.regions,
        "matched": matched,
        "scored": before.images,
        "before": before.scores,
        "after": after.scores,
        "note": after.provenance.note(),
    }


def synthetic_set(folder: Path, args: argparse.Namespace) -> Path:
    write_synthetic_eval_set(
        folder / "synthetic",
        classes=numbered_classes(args.classes),
        images_per_class=args.images_per_class,
        masks_per_image=(12, 32),
        seed=5,
    )
    return folder / "synthetic"


def voc_set(root: Path, folder: Path) -> Path:
    sam, info = build_sam("tiny")
    engine = build_engine("tiny", sam, TINY_AMG)
    trainer = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}
    extract(VOCSegmentation(root, "val"), folder / "voc", engine, info, trainer_args=trainer)
    return folder / "voc" / "eval"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviewed", type=int, default=20, help="images the reviewer labels")
    parser.add_argument("--epochs", type=int, default=FineTuneSettings().max_epochs)
    parser.add_argument("--threshold", type=float, default=InferenceSettings().confidence_threshold)
    parser.add_argument("--classes", type=int, default=5, help="synthetic classes")
    parser.add_argument("--images-per-class", type=int, default=10, help="synthetic images")
    parser.add_argument("--voc", type=Path, help="a VOC2012 folder: also run the loop on it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    print(
        f"one review turn: {args.reviewed} images reviewed from their ground truth, the head "
        f"fine-tuned for {args.epochs} epochs, the other images scored at confidence "
        f"{args.threshold} before and after"
    )
    print(
        "| set | reviewed images | regions | proposals matched | scored images | mIoU before "
        "| mIoU after | mAP50 before | mAP50 after |"
    )
    print("| --- " * 9 + "|")
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        sets = [("synthetic", synthetic_set(folder, args))]
        if args.voc:
            sets.append(("voc", voc_set(args.voc, folder)))
        for name, eval_dir in sets:
            row = loop_turn(name, eval_dir, args, folder / f"{name}_turn")
            before, after = row["before"], row["after"]
            print(
                f"| {name} | {row['reviewed']} | {row['regions']} | {row['matched']} "
                f"| {row['scored']} "
                f"| {before['mIoU']:.2f} | {after['mIoU']:.2f} "
                f"| {before['mAP50']:.4f} | {after['mAP50']:.4f} |{row['note']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
