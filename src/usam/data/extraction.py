"""Run SAM's automatic mask generation over an image source into embedding shard sets.

``python -m usam.extract source=image_set data=voc sam=vit_b`` (or ``fit``, when a
shard set it needs is missing) writes ``<out_dir>/train`` and ``<out_dir>/val``
for a training source (each image goes to val with probability ``val_fraction``,
decided by a hash of its key, so the split never changes) or ``<out_dir>/eval``
for an evaluation source. The work runs through ``Trainer.predict``: one process
or Lightning DDP over GPUs and nodes, every rank writing its own shard series,
rank zero listing them all in each manifest at the end. Images already in the
shards, or already rejected, are skipped, so an interrupted run picks up where it
stopped; unusable files go to ``rejected.jsonl`` with the reason. ``out_dir`` may be a
URL (``s3://...``): each finished shard is uploaded there, and the rejection log stays in
the local staging folder of ``formats.storage``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from usam.core.stopping import pass_stops_to, stop_if_requested, worker_init_fn
from usam.data.rejections import Rejected, merge_rejected, rejected_keys
from usam.data.sources import ImageSource, RejectedImage, SourceImage
from usam.formats import storage
from usam.formats.embedding_shards import (
    DEFAULT_EMBED_DIM,
    MANIFEST_NAME,
    Manifest,
    ShardSetWriter,
    existing_keys,
    mixed_order,
    read_manifest,
)
from usam.sam.amg_settings import AmgSettings
from usam.sam.mask_engine import PointGridEngine
from usam.sam.registry import SamSettings, build_engine

log = logging.getLogger(__name__)

SLOW_FACTOR = 5.0  # an image this many times slower than the median is reported


@dataclass
class ExtractSettings:
    """The ``extract`` config group: how SAM embeddings are written."""

    val_fraction: float = 0.05  # training sources: share of images held out (by key hash)
    images_per_shard: int = 32  # docs/shards.md says why
    shuffle_seed: int = 0  # training sources: images are written in this seeded random order
    num_workers: int = 2  # image decoding processes
    trainer: dict[str, Any] = field(default_factory=dict)  # Trainer arguments of the predict loop

    def check(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.images_per_shard < 1 or self.num_workers < 0:
            raise ValueError(
                f"images_per_shard={self.images_per_shard} must be >= 1 and "
                f"num_workers={self.num_workers} >= 0"
            )


def splits_for(source: ImageSource, val_fraction: float) -> tuple[str, ...]:
    if source.kind == "eval":
        return ("eval",)
    return ("train", "val") if val_fraction > 0 else ("train",)


def split_of(key: str, kind: str, val_fraction: float) -> str:
    """A fixed split per image: the first 8 hex digits of sha256(key) as a fraction."""
    if kind == "eval":
        return "eval"
    position = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
    return "val" if position < val_fraction else "train"


def shard_set_id(
    source: ImageSource, sam: SamSettings, settings: AmgSettings, val_fraction: float
) -> str:
    """Cache key of a shard set: what went in and how SAM ran."""
    payload = {
        "source": source.fingerprint(),
        "sam": sam.identity(),
        "amg": asdict(settings),
        "val_fraction": val_fraction if source.kind == "train" else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def is_complete(out_dir: storage.Location, splits: tuple[str, ...]) -> bool:
    return all(storage.is_file(storage.join(out_dir, split, MANIFEST_NAME)) for split in splits)


class _PendingImages(Dataset):
    """The source images still to extract; unusable files come out as ``Rejected``."""

    def __init__(self, source: ImageSource, indices: list[int]) -> None:
        self.source = source
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> SourceImage | Rejected:
        index = self.indices[position]
        try:
            return self.source.load(index)
        except RejectedImage as error:
            return Rejected(self.source.keys[index], error.path, error.reason)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


class ExtractionModule(L.LightningModule):
    """SAM in automatic mode as a predict-only module, so Lightning places and splits it."""

    def __init__(self, engine: PointGridEngine) -> None:
        super().__init__()
        self.engine = engine
        self.sam = engine.model  # registered, so the strategy moves it to the device
        self.seconds: list[float] = []  # per image, to point out the outliers

    def _note_time(self, item: SourceImage, seconds: float) -> None:
        """Say which image took far longer than the others so far: usually a huge photo."""
        if len(self.seconds) >= 3 and seconds > SLOW_FACTOR * statistics.median(self.seconds):
            width, height = item.image.size
            log.warning(
                "%s took %.1f s, %.0fx the median so far, at %dx%d pixels; "
                "max_side bounds the size SAM works at",
                item.source.get("path", item.key),
                seconds,
                seconds / statistics.median(self.seconds),
                width,
                height,
            )
        self.seconds.append(seconds)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # PIL images; the engine moves pixels to the model's device itself

    def predict_step(self, batch: list[SourceImage | Rejected], batch_idx: int) -> list[Any]:
        outputs = []
        for item in batch:
            if isinstance(item, Rejected):
                outputs.append(item)
                continue
            started = time.perf_counter()
            masks = self.engine.generate(np.asarray(item.image))
            self._note_time(item, time.perf_counter() - started)
            outputs.append(
                masks.to_record(
                    item.key,
                    labels=item.labels,
                    ground_truth=item.ground_truth,
                    source=item.source,
                )
            )
        return outputs


class ShardPredictionWriter(BasePredictionWriter):
    """Writes each rank's records into its own shard series; rank zero writes the manifests."""

    def __init__(
        self,
        out_dir: storage.Location,
        manifests: dict[str, Manifest],
        kind: str,
        val_fraction: float,
        images_per_shard: int,
    ) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = out_dir
        self.manifests = manifests
        self.kind = kind
        self.val_fraction = val_fraction
        self.images_per_shard = images_per_shard
        self._stack = ExitStack()
        self.writers: dict[str, ShardSetWriter] = {}
        self.counts = {"images": 0, "masks": 0, "rejected": 0}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        series = f"r{trainer.global_rank}-" if trainer.world_size > 1 else ""
        for split, manifest in self.manifests.items():
            self.writers[split] = self._stack.enter_context(
                ShardSetWriter(
                    storage.join(self.out_dir, split),
                    manifest,
                    images_per_shard=self.images_per_shard,
                    series=series,
                    write_manifest=False,
                )
            )
        self._rejections = storage.staging_folder(self.out_dir)  # appended to as it goes
        self._rejected_path = self._rejections / f"rejected-r{trainer.global_rank}.jsonl"
        pass_stops_to([proc.pid for proc in getattr(trainer.strategy.launcher, "procs", [])])

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        for item in prediction:
            if isinstance(item, Rejected):
                with open(self._rejected_path, "a") as handle:
                    handle.write(json.dumps(asdict(item)) + "\n")
                self.counts["rejected"] += 1
                continue
            self.writers[split_of(item.key, self.kind, self.val_fraction)].write(item)
            self.counts["images"] += 1
            self.counts["masks"] += item.num_masks
        stop_if_requested()  # every finished image is in a shard: a clean place to stop

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every rank's last shard is complete before rank zero lists them all, and the
        manifests are on disk before any rank returns to read them back. The counts become
        the whole run's."""
        self._stack.close()
        counts = torch.tensor(list(self.counts.values()), device=pl_module.device)
        totals = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        self.counts = dict(zip(self.counts, map(int, totals)))
        trainer.strategy.barrier("usam-extract-finished")
        if trainer.is_global_zero:
            for writer in self.writers.values():
                writer.finalize()
            merge_rejected(self._rejections)
        trainer.strategy.barrier("usam-extract-listed")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stack.close()  # keep what was written; no manifest, so the next run resumes


def pending_images(source: ImageSource, out_dir: storage.Location, shuffle_seed: int) -> list[int]:
    """Indices of the images still to extract, in the order they are written: a training
    source's in ``mixed_order(len(source), shuffle_seed)``, which a resumed run keeps, so
    that every shard mixes the classes; an evaluation source's as listed."""
    skip = rejected_keys(storage.staging_folder(out_dir))
    for split in ("train", "val", "eval"):
        skip |= existing_keys(storage.join(out_dir, split))
    train = source.kind == "train"
    order = mixed_order(len(source), shuffle_seed) if train else range(len(source))
    return [i for i in order if source.keys[i] not in skip]


def _manifests(
    source: ImageSource,
    splits: tuple[str, ...],
    settings: AmgSettings,
    sam_info: dict[str, Any],
    config: dict[str, Any],
    shuffle_seed: int,
) -> dict[str, Manifest]:
    """The manifest each split gets: what went in and how SAM ran (``config`` holds the
    extraction's own settings)."""
    fingerprint = source.fingerprint()
    return {
        split: Manifest(
            classes=list(source.classes),
            embed_dim=DEFAULT_EMBED_DIM,
            kind="eval" if split == "eval" else "train",
            sam=dict(sam_info),
            images_random_weights=source.random_weights,
            shuffle_seed=shuffle_seed if source.kind == "train" else None,
            config={
                **config,
                "split": split,
                "source_fingerprint": fingerprint,
                "amg": asdict(settings),
            },
        )
        for split in splits
    }


def extract(
    source: ImageSource,
    out_dir: str | Path,
    engine: PointGridEngine,
    sam_info: dict[str, Any],
    *,
    val_fraction: float = 0.05,
    images_per_shard: int = 32,
    shuffle_seed: int = 0,
    config: dict[str, Any] | None = None,
    trainer_args: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> dict[str, Manifest]:
    """Extract every image of ``source`` not yet in ``out_dir``; returns the split manifests."""
    out_dir = storage.location(out_dir)
    splits = splits_for(source, val_fraction)
    if is_complete(out_dir, splits):
        return {split: read_manifest(storage.join(out_dir, split)) for split in splits}
    storage.make_folder(out_dir)
    pending = pending_images(source, out_dir, shuffle_seed)
    for path, reason in source.listing_rejected:
        log.warning("rejected while listing: %s (%s)", path, reason)
    run_config = {**(config or {}), "val_fraction": val_fraction}
    manifests = _manifests(source, splits, engine.settings, sam_info, run_config, shuffle_seed)
    writer = ShardPredictionWriter(out_dir, manifests, source.kind, val_fraction, images_per_shard)
    loader = DataLoader(
        _PendingImages(source, pending),
        batch_size=1,
        num_workers=num_workers,
        worker_init_fn=worker_init_fn(),
        collate_fn=_as_list,
    )
    args = {"accelerator": "auto", "devices": 1, "logger": False, **(trainer_args or {})}
    trainer = L.Trainer(callbacks=[writer], enable_checkpointing=False, **args)
    started = time.perf_counter()
    trainer.predict(ExtractionModule(engine), dataloaders=loader, return_predictions=False)
    if trainer.is_global_zero:
        seconds = time.perf_counter() - started
        log.info(
            "extracted %d images (%d masks) in %.1f s (%.2f images/s), rejected %d, "
            "skipped %d already done, into %s%s",
            writer.counts["images"],
            writer.counts["masks"],
            seconds,
            writer.counts["images"] / max(seconds, 1e-9),
            writer.counts["rejected"],
            len(source) - len(pending),
            out_dir,
            next(iter(manifests.values())).provenance.note(),
        )
    return {split: read_manifest(storage.join(out_dir, split)) for split in splits}


def shard_set_dir(
    shards_root: str | Path,
    name: str,
    source: ImageSource,
    sam: SamSettings,
    settings: AmgSettings,
    val_fraction: float,
) -> storage.Location:
    """Where the cached shard set of ``source`` under these settings lives."""
    cache_id = shard_set_id(source, sam, settings, val_fraction)
    return storage.join(storage.location(shards_root), f"{name}-{sam.model_type}-{cache_id}")


def run_extraction(
    source: ImageSource,
    out_dir: str | Path,
    sam: SamSettings,
    settings: AmgSettings,
    extract_settings: ExtractSettings,
    *,
    config: dict[str, Any] | None = None,
) -> dict[str, Manifest]:
    """Build SAM (only when work is left) and extract."""
    splits = splits_for(source, extract_settings.val_fraction)
    out_dir = storage.location(out_dir)
    if is_complete(out_dir, splits):
        return {split: read_manifest(storage.join(out_dir, split)) for split in splits}
    rank_zero_only(print)(f"extracting SAM embeddings of {len(source)} images into {out_dir}")
    model, sam_info = sam.build()
    return extract(
        source,
        out_dir,
        build_engine(sam.model_type, model, settings),
        sam_info,
        val_fraction=extract_settings.val_fraction,
        images_per_shard=extract_settings.images_per_shard,
        shuffle_seed=extract_settings.shuffle_seed,
        config=config,
        num_workers=extract_settings.num_workers,
        trainer_args=dict(extract_settings.trainer),
    )
