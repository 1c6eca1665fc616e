"""The training stream: batches as mixed as a full shuffle, a new order every epoch, the same
order for the same seed, and extraction writing a training set's classes mixed."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from usam.data.datamodule import ShardDataModule
from usam.data.extraction import extract
from usam.data.sources import ImageShardSource
from usam.formats.embedding_shards import (
    ImageRecord,
    Manifest,
    ShardSetWriter,
    iter_records,
    read_manifest,
)
from usam.formats.image_shards import ImageShardWriter, encode_jpeg
from usam.sam.registry import build_sam
from usam.sam.sam1_backend import AutomaticMaskEngine
from usam.testing.synthetic import write_synthetic_shard_set

from helpers.commands import compose_config
from helpers.evaluation import AMG, FAST
from helpers.shards import quiet_trainer, synthetic_datamodule

CLASSES = [f"class{i:02d}" for i in range(20)]


@pytest.fixture(scope="module")
def voc_shaped_set(tmp_path_factory) -> Path:
    """20 classes x 200 images in 500-image shards, listed class by class: the shape of a
    Stable Diffusion set (tiny embeddings; only the order matters here)."""
    root = tmp_path_factory.mktemp("stream")
    for split, per_class in (("train", 200), ("val", 2)):
        write_synthetic_shard_set(
            root / split,
            classes=CLASSES,
            split=split,
            images_per_class=per_class,
            masks_per_image=(1, 2),
            multi_label_fraction=0.0,
            embed_dim=8,
            images_per_shard=500,
        )
    return root


def voc_defaults() -> dict:
    data = compose_config("fit", ["experiment=voc_sd"]).data
    return {k: data[k] for k in ("batch_size", "shuffle_buffer", "num_workers", "seed")}


def datamodule(root: Path, **overrides) -> ShardDataModule:
    module = ShardDataModule(
        CLASSES,
        train_dir=str(root / "train"),
        val_dir=str(root / "val"),
        source="synthetic",
        embed_dim=8,
        **{**voc_defaults(), **overrides},
    )
    module.setup("fit")
    return module


def epoch_batches(module: ShardDataModule, epoch: int) -> list[list[str]]:
    loader = module.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does as each epoch starts
    return [batch["keys"] for batch in loader]


def distinct_classes(batches: list[list[str]]) -> float:
    return float(np.mean([len({key.split("_")[1] for key in keys}) for keys in batches]))


def full_shuffle_distinct(batch_size: int, runs: int = 20) -> float:
    labels = np.repeat(np.arange(20), 200)
    rng = np.random.default_rng(0)
    means = []
    for _ in range(runs):
        order = rng.permutation(labels)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        means.append(np.mean([len(set(b.tolist())) for b in batches]))
    return float(np.mean(means))


@pytest.mark.slow
def test_batches_mix_classes_like_a_full_shuffle_and_every_epoch_differs(voc_shaped_set):
    module = datamodule(voc_shaped_set)
    assert module.num_workers == 2 and module.batch_size == 32
    epochs = [epoch_batches(module, epoch) for epoch in (0, 1)]
    full = full_shuffle_distinct(module.batch_size)
    for batches in epochs:
        assert sorted(k for keys in batches for k in keys) == sorted(
            r.key for r in iter_records(voc_shaped_set / "train")
        )
        assert distinct_classes(batches) >= 0.9 * full, (distinct_classes(batches), full)
        assert len({key.split("_")[1] for key in batches[0]}) > 1  # no single-class start
    assert epochs[0] != epochs[1]
    again = datamodule(voc_shaped_set)
    assert [epoch_batches(again, epoch) for epoch in (0, 1)] == epochs
    other_seed = datamodule(voc_shaped_set, seed=1)
    assert epoch_batches(other_seed, 0) != epochs[0]


def test_a_set_listed_class_by_class_is_named(tmp_path, caplog):
    """A set written before shards were mixed still trains, with a warning saying why its
    batches hold few classes and how to fix it."""
    for split in ("train", "val"):
        manifest = Manifest(classes=CLASSES, embed_dim=8, kind="train", sam={"model_type": "t"})
        with ShardSetWriter(tmp_path / split, manifest) as writer:
            for c in range(20):
                writer.write(record(f"{split}_{c:03d}_00000", c))
    with caplog.at_level(logging.WARNING):
        datamodule(tmp_path)
    assert "re-extract it" in caplog.text and str(tmp_path / "train") in caplog.text


def record(key: str, class_index: int) -> ImageRecord:
    labels = [0] * 20
    labels[class_index] = 1
    return ImageRecord(
        key=key, height=4, width=4, embeddings=np.zeros((1, 8)), iou_preds=np.ones(1),
        stability=np.ones(1), boxes=np.zeros((1, 4)), points=np.zeros((1, 2)),
        multimask=np.zeros(1), rles=["04"], labels=labels,
    )  # fmt: skip


class KeyRecorder(L.LightningModule):
    """Trains nothing; records which images each epoch's batches held."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.epochs: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.epochs.setdefault(self.current_epoch, []).extend(batch["keys"])
        return self.weight.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_orders(shard_sets, tmp_path) -> dict[int, list[str]]:
    module = KeyRecorder()
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(module, datamodule=synthetic_datamodule(shard_sets, num_workers=2))
    return module.epochs


def test_lightning_tells_the_stream_its_epoch(shard_sets, tmp_path):
    first = fit_orders(shard_sets, tmp_path / "a")
    assert sorted(first[0]) == sorted(first[1]) and first[0] != first[1]
    assert fit_orders(shard_sets, tmp_path / "b") == first


def test_extraction_writes_a_training_set_in_a_seeded_mixed_order(tmp_path):
    """Real tiny-SAM extraction of an image set listed class by class, as generation lists it."""
    classes = ["cat", "dog", "bird"]
    with ImageShardWriter(
        tmp_path / "images", vocabulary="custom", classes=classes, source="folder"
    ) as writer:
        for c, name in enumerate(classes):
            for i in range(4):
                pixels = np.random.default_rng([c, i]).integers(0, 256, (32, 40, 3), np.uint8)
                meta = {"class_name": name, "class_index": c, "source": "folder"}
                writer.write(f"{name}-{i}", encode_jpeg(Image.fromarray(pixels)), meta)
    source = ImageShardSource(tmp_path / "images")
    engine = AutomaticMaskEngine(build_sam("tiny")[0], AMG)
    orders = []
    for seed in (0, 0, 1):
        out = tmp_path / f"shards-{len(orders)}"
        extract(source, out, engine, {"model_type": "tiny", "random_weights": True},
                val_fraction=0.0, shuffle_seed=seed, trainer_args=FAST)  # fmt: skip
        assert read_manifest(out / "train").shuffle_seed == seed
        orders.append([r.key for r in iter_records(out / "train")])
    assert sorted(orders[0]) == sorted(source.keys)
    assert orders[0] == orders[1] != orders[2]
    assert orders[0] != list(source.keys)  # not class by class
