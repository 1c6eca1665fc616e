"""Training and evaluation throughput of the head on synthetic embedding shards.

Writes (once, cached in --data) synthetic shards for 20 classes x --per-class images,
then for 0, 1 and 2 loader workers trains the teacher for one epoch and prints
seconds per epoch, images/s, masks/s and peak resident memory; finally the
Predictor's images/s over the validation set. The shards are synthetic, so only
the timings mean anything.

    python benchmarks/train_speed.py --per-class 200
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time
from pathlib import Path

import lightning as L
import torch

from usam.data.datamodule import ShardDataModule
from usam.formats.embedding_shards import iter_records, read_manifest
from usam.inference.predictor import Predictor
from usam.testing.synthetic import write_synthetic_shard_set
from usam.train.lightning_modules import TeacherModule


def peak_rss_mib() -> float:
    """Peak resident memory of this process and its finished children (loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def ensure_shards(root: Path, per_class: int) -> dict[str, Path]:
    dirs = {split: root / f"voc20-n{per_class}" / split for split in ("train", "val")}
    for split, directory in dirs.items():
        if not (directory / "manifest.json").is_file():
            start = time.perf_counter()
            count = per_class if split == "train" else max(1, per_class // 10)
            write_synthetic_shard_set(
                directory,
                classes="voc20",
                split=split,
                images_per_class=count,
                images_per_shard=200,
            )
            print(f"wrote {split} shards in {time.perf_counter() - start:.1f} s")
    return dirs


def train_epoch(
    dirs: dict[str, Path], workers: int, batch_size: int
) -> tuple[dict[str, float], TeacherModule]:
    datamodule = ShardDataModule(
        classes="voc20",
        train_dir=str(dirs["train"]),
        val_dir=str(dirs["val"]),
        source="synthetic",
        sam_model_type="tiny",
        batch_size=batch_size,
        num_workers=workers,
    )
    module = TeacherModule(datamodule.classes, sam_model_type="tiny")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    manifest = read_manifest(dirs["train"])
    return {
        "seconds": seconds,
        "images_per_s": manifest.num_images / seconds,
        "masks_per_s": manifest.num_masks / seconds,
    }, module


def evaluation_speed(module: TeacherModule, val_dir: Path, ckpt: Path) -> float:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(ckpt)
    predictor = Predictor.from_checkpoint(ckpt)
    records = list(iter_records(val_dir))
    start = time.perf_counter()
    for record in records:
        predictor(record)
    return len(records) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", type=Path, default=Path("data/benchmarks"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print("SYNTHETIC embeddings, untrained head: only the timings below mean anything")
    dirs = ensure_shards(args.data, args.per_class)
    manifest = read_manifest(dirs["train"])
    print(
        f"train set: {manifest.num_images} images, {manifest.num_masks} masks, "
        f"{len(manifest.shards)} shards; torch threads {torch.get_num_threads()}"
    )
    print(f"{'workers':>7} {'s/epoch':>8} {'images/s':>9} {'masks/s':>9} {'peak MiB':>9}")
    module = None
    for workers in args.workers:
        result, module = train_epoch(dirs, workers, args.batch_size)
        print(
            f"{workers:>7} {result['seconds']:>8.1f} {result['images_per_s']:>9.0f} "
            f"{result['masks_per_s']:>9.0f} {peak_rss_mib():>9.0f}"
        )
    rate = evaluation_speed(module, dirs["val"], args.data / "bench_head.ckpt")
    print(f"evaluation (Predictor, threshold + NMS): {rate:.1f} images/s")


if __name__ == "__main__":
    main()
