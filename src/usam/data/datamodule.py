"""Stream embedding shard sets into padded mask-set batches with WebDataset.

Training shuffles shards and samples (a buffer) anew every epoch, from ``data.seed`` and
the epoch Lightning reports, so epochs differ and a run repeats; extraction writes a
training set's images in a seeded random order, so a shard already mixes the classes and
any buffer size gives batches as mixed as a full shuffle. Evaluation reads in a fixed
order. Under DDP each rank reads its part of a set (``rank_shares``: whole shards where there
are enough, else every ``world_size``-th image), so ranks see disjoint images and together
all of them, with any number of ranks; loader workers split a rank's part by shard.
Training under DDP repeats each rank's part and cuts every rank's epoch to the same number
of batches (``with_epoch``), so ranks stay in step even when their parts hold different
numbers of images.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds

from usam.core.config import ConfigError
from usam.core.provenance import Provenance
from usam.core.stopping import worker_init_fn
from usam.core.vocabulary import load_vocabulary
from usam.data.extraction import ExtractSettings
from usam.data.pipeline import TrainingPipeline
from usam.data.rank_shares import RankShare
from usam.formats import storage
from usam.formats.embedding_shards import (
    DEFAULT_EMBED_DIM,
    ImageRecord,
    Manifest,
    ShardSetError,
    check_manifest,
    decode_sample,
    read_manifest,
    shard_urls,
)
from usam.images.stable_diffusion import GenerateSettings
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings
from usam.testing.synthetic import write_synthetic_shard_set

log = logging.getLogger(__name__)


def collate_records(records: Sequence[ImageRecord]) -> dict[str, Any]:
    """Pad the variable mask counts of a batch; ``valid`` marks the real masks."""
    counts = [r.num_masks for r in records]
    size, dim = max(counts), records[0].embeddings.shape[1]
    embeddings = np.zeros((len(records), size, dim), dtype=np.float16)
    multimask = np.zeros((len(records), size), dtype=np.int64)
    valid = np.zeros((len(records), size), dtype=bool)
    for row, record in enumerate(records):
        embeddings[row, : record.num_masks] = record.embeddings
        multimask[row, : record.num_masks] = record.multimask
        valid[row, : record.num_masks] = True
    batch: dict[str, Any] = {
        "keys": [r.key for r in records],
        "embeddings": torch.from_numpy(embeddings),
        "multimask": torch.from_numpy(multimask),
        "valid": torch.from_numpy(valid),
    }
    if all(r.labels is not None for r in records):
        batch["labels"] = torch.tensor([r.labels for r in records], dtype=torch.float32)
    return batch


def _has_masks(record: ImageRecord) -> bool:
    return record.num_masks > 0


class EpochSeed:
    """The epoch a training stream shuffles for. Lightning calls ``set_epoch`` on a train
    loader's ``sampler`` as every epoch starts (also when resuming); a WebDataset loader has
    none, so it carries this one, and the workers started for that epoch read it."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def stream_seed(*parts: int) -> int:
    """One seed from several integers (unlike ``hash``, the same in every process)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@dataclass
class TrainingStream(torch.utils.data.IterableDataset):
    """Training batches of one epoch: the shard order is shuffled by (seed, epoch), the same
    on every rank so that the ranks' parts stay disjoint; each rank and worker then
    shuffles its samples through a buffer seeded by (seed, epoch, rank, worker)."""

    urls: list[str]
    seed: int
    shuffle_buffer: int
    batch_size: int
    partial: bool
    epoch: EpochSeed
    share: RankShare

    def __iter__(self):
        epoch = self.epoch.epoch
        _, _, worker, _ = wds.utils.pytorch_worker_info()
        shards = list(self.urls)
        random.Random(stream_seed(self.seed, epoch)).shuffle(shards)
        samples_rng = random.Random(stream_seed(self.seed, epoch, self.share.rank, worker))
        pipeline = wds.DataPipeline(
            self.share.samples(shards),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=samples_rng),
            wds.map(decode_sample),
            wds.select(_has_masks),
            wds.batched(self.batch_size, collation_fn=collate_records, partial=self.partial),
        )
        return iter(pipeline)


class ShardDataModule(L.LightningDataModule):
    """Training and validation shard sets for one vocabulary and SAM model type.

    Either name the shard sets (``train_dir``/``val_dir``; ``source: synthetic``
    writes them on demand) or give the typed ``sam``, ``amg``, ``generate`` and
    ``extract`` settings with ``images_dir`` and ``shards_dir``: missing images are
    generated and missing shards extracted in ``prepare_data``, cached by a hash of
    their inputs.
    """

    def __init__(
        self,
        classes: str | Sequence[str],
        train_dir: str | None = None,
        val_dir: str | None = None,
        source: str = "sd",
        images_dir: str | None = None,
        shards_dir: str | None = None,
        sam: SamSettings | None = None,
        amg: AmgSettings | None = None,
        generate: GenerateSettings | None = None,
        extract: ExtractSettings | None = None,
        embed_dim: int = DEFAULT_EMBED_DIM,
        sam_model_type: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        seed: int = 0,
        synthetic: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.vocabulary = load_vocabulary(classes)
        self.classes = self.vocabulary.classes
        self.pipeline = None
        if train_dir is None or val_dir is None:
            if not (images_dir and shards_dir and sam and amg and generate and extract):
                raise ConfigError(
                    "data: give train_dir and val_dir, or images_dir and shards_dir with the "
                    "sam, amg, generate and extract settings"
                )
            self.pipeline = TrainingPipeline(
                vocabulary=self.vocabulary,
                source=source,
                images_root=Path(images_dir),
                shards_root=Path(shards_dir),
                sam=sam,
                amg=amg,
                generate=generate,
                extract=extract,
            )
        # a local folder or a URL (s3://, gs://, https://): docs/shards.md, object storage
        self.train_dir = storage.location(train_dir) if train_dir else None
        self.val_dir = storage.location(val_dir) if val_dir else None
        self.source = source
        self.embed_dim = embed_dim
        self.sam_model_type = sam_model_type
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.synthetic = dict(synthetic or {})
        self.name = name
        self.manifests: dict[str, Manifest] = {}

    def prepare_data(self) -> None:
        """Make missing shard sets: synthetic ones, or images and SAM embeddings."""
        if self.pipeline is not None:
            self._use_shard_set(self.pipeline.prepare())
            return
        for split, directory in (("train", self.train_dir), ("val", self.val_dir)):
            if storage.is_file(storage.join(directory, "manifest.json")):
                continue
            if self.source != "synthetic":
                raise ShardSetError(
                    f"no {split} shard set at {directory} (data.{split}_dir): extract embeddings "
                    "for this vocabulary and SAM model type there first"
                )
            write_synthetic_shard_set(
                directory,
                classes=list(self.classes),
                split=split,
                embed_dim=self.embed_dim,
                sam_model_type=self.sam_model_type or "tiny",
                seed=self.seed,
                **self.synthetic,
            )

    def _use_shard_set(self, directory: storage.Location) -> None:
        self.train_dir, self.val_dir = directory / "train", directory / "val"

    def setup(self, stage: str | None = None) -> None:
        if self.pipeline is not None:
            self._use_shard_set(self.pipeline.locate())
        for split, directory in (("train", self.train_dir), ("val", self.val_dir)):
            manifest = read_manifest(directory)
            check_manifest(
                manifest,
                directory,
                classes=self.classes,
                embed_dim=self.embed_dim,
                sam_model_type=self.sam_model_type,
                # the head learns the train set's masks: the val set's are made as they are
                precision=self.manifests["train"].precision if split == "val" else None,
            )
            self.manifests[split] = manifest
        if self.manifests["train"].shuffle_seed is None and len(self.classes) > 1:
            log.warning(
                "%s holds its images in the order they were listed (class by class for a "
                "generated set): training batches will mix few classes; re-extract it, which "
                "writes them in a seeded random order",
                self.train_dir,
            )

    @property
    def provenance(self) -> Provenance:
        """Why a head trained on these shard sets gives no results: their reasons, merged."""
        return Provenance.merged(m.provenance for m in self.manifests.values())

    def rank_share(self) -> RankShare:
        """This process's part of every set, as the trainer reports its rank (one process
        outside a trainer)."""
        trainer = self.trainer
        if trainer is None:
            return RankShare()
        return RankShare(trainer.global_rank, trainer.world_size)

    def _workers_for(self, share: RankShare, num_shards: int) -> int:
        workers = share.workers(self.num_workers, num_shards)
        if workers < self.num_workers:
            log.warning(
                "data.num_workers=%d capped at %d: workers split shards, and a rank reads %d "
                "of the set's %d",
                self.num_workers,
                workers,
                share.shards_read(num_shards),
                num_shards,
            )
        return workers

    def train_dataloader(self) -> wds.WebLoader:
        manifest = self.manifests["train"]
        urls = shard_urls(self.train_dir, manifest)
        share = self.rank_share()
        world_size = share.world_size
        workers = self._workers_for(share, len(urls))
        # under DDP each worker drops its partial batch; a rank left with no full batch at
        # all would end its epoch at once, by pigeonhole unless it reads this many images
        full_batch = max(workers, 1) * (self.batch_size - 1) + 1
        self._check_each_rank_reads(
            self.train_dir,
            manifest,
            share,
            full_batch,
            f"for a full batch of data.batch_size={self.batch_size} in one of its "
            f"{max(workers, 1)} loader process(es): lower data.batch_size or data.num_workers",
        )
        epoch = EpochSeed()
        stream = TrainingStream(
            urls,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            batch_size=self.batch_size,
            partial=world_size == 1,
            epoch=epoch,
            share=share,
        )
        loader = wds.WebLoader(
            stream, batch_size=None, num_workers=workers, worker_init_fn=worker_init_fn()
        )
        loader.sampler = epoch  # where Lightning's set_epoch finds it
        # every rank runs the same number of batches (full ones); the count is also the
        # progress total. In one process it is an upper bound, which Lightning must not cut
        # an epoch at: each worker may end on a partial batch, and images without masks are
        # dropped on the way.
        batches_per_rank = math.ceil(manifest.num_images / (world_size * self.batch_size))
        if world_size > 1:
            return loader.with_epoch(batches_per_rank).with_length(batches_per_rank, silent=True)
        return loader.with_length(batches_per_rank + max(workers - 1, 0), silent=True)

    @staticmethod
    def _check_each_rank_reads(
        directory: storage.Location, manifest: Manifest, share: RankShare, needed: int, why: str
    ) -> None:
        """Under DDP a rank that runs out of batches first leaves the others waiting for it
        (for its gradients, or for its part of the metrics)."""
        if share.world_size == 1:
            return
        fewest = share.fewest_images([shard["images"] for shard in manifest.shards])
        if fewest < needed:
            raise ShardSetError(
                f"{directory} holds {manifest.num_images} images: one of {share.world_size} "
                f"ranks may read only {fewest}, and needs {needed} {why}, or run on fewer "
                "devices"
            )

    def eval_loader(self, directory: storage.Location, manifest: Manifest) -> wds.WebLoader:
        """Every image once, in shard order, split over ranks and workers."""
        urls = shard_urls(directory, manifest)
        share = self.rank_share()
        self._check_each_rank_reads(
            directory, manifest, share, 1, "to take part: give the set more images"
        )
        dataset = wds.DataPipeline(
            share.samples(urls),
            wds.map(decode_sample),
            wds.select(_has_masks),
            wds.batched(self.batch_size, collation_fn=collate_records, partial=True),
        )
        loader = wds.WebLoader(
            dataset,
            batch_size=None,
            num_workers=self._workers_for(share, len(urls)),
            worker_init_fn=worker_init_fn(),
        )
        if share.world_size > 1:  # a rank's batch count depends on how its workers split shards
            return loader
        return loader.with_length(math.ceil(manifest.num_images / self.batch_size), silent=True)

    def val_dataloader(self) -> wds.WebLoader:
        return self.eval_loader(self.val_dir, self.manifests["val"])

    def test_dataloader(self) -> wds.WebLoader:
        """The held-out training images again: test reports on the final (best) head."""
        return self.val_dataloader()
