from __future__ import annotations

import collections
import json
import tarfile
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from usam.data.datamodule import ShardDataModule
from usam.formats.embedding_shards import (
    ImageRecord,
    Manifest,
    ShardSetError,
    ShardSetWriter,
    iter_records,
    read_manifest,
)
from usam.formats.storage import atomic_write_text
from usam.testing.synthetic import write_synthetic_shard_set

from helpers.shards import SMALL_CLASSES, synthetic_datamodule

DIM = 16


def make_record(key: str, count: int, rng: np.random.Generator) -> ImageRecord:
    masks = rng.random((count, 6, 7)) > 0.5
    rles = [
        mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode() for m in masks
    ]
    return ImageRecord(
        key=key,
        height=6,
        width=7,
        embeddings=rng.standard_normal((count, DIM)).astype(np.float16),
        iou_preds=rng.random(count).astype(np.float32),
        stability=rng.random(count).astype(np.float32),
        boxes=rng.random((count, 4)).astype(np.float32),
        points=rng.random((count, 2)).astype(np.float32),
        multimask=rng.integers(0, 3, count).astype(np.int8),
        rles=rles,
        labels=[1, 0, 1],
        source={"file": f"{key}.jpg"},
    ), masks


def new_manifest() -> Manifest:
    return Manifest(
        classes=["a", "b", "c"],
        embed_dim=DIM,
        kind="train",
        sam={"model_type": "tiny", "checkpoint_sha256": None, "random_weights": True},
    )


def test_round_trip_keeps_every_field(tmp_path):
    rng = np.random.default_rng(0)
    originals = {}
    with ShardSetWriter(tmp_path, new_manifest(), images_per_shard=2) as writer:
        for i in range(5):
            record, masks = make_record(f"img-{i}", i, rng)  # includes an image with no masks
            originals[record.key] = (record, masks)
            writer.write(record)
    manifest = read_manifest(tmp_path)
    assert (manifest.num_images, manifest.num_masks, len(manifest.shards)) == (5, 10, 3)
    counts = json.loads((tmp_path / "manifest.json").read_text())["counts"]
    assert counts == {"images": 5, "masks": 10, "shards": 3}
    decoded = list(iter_records(tmp_path))
    assert [r.key for r in decoded] == list(originals)
    for record in decoded:
        original, masks = originals[record.key]
        for name in ("embeddings", "iou_preds", "stability", "boxes", "points", "multimask"):
            np.testing.assert_array_equal(getattr(record, name), getattr(original, name))
        assert record.embeddings.dtype == np.float16
        assert record.labels == [1, 0, 1] and record.source == original.source
        if record.num_masks:
            decoded_masks = mask_utils.decode(record.coco_rles()).transpose(2, 0, 1)
            np.testing.assert_array_equal(decoded_masks, masks)


def test_only_npy_and_json_entries_are_written(tmp_path):
    write_synthetic_shard_set(tmp_path, classes=["cat", "dog"], images_per_class=2)
    names = []
    for shard in read_manifest(tmp_path).shards:
        with tarfile.open(tmp_path / shard["name"]) as tar:
            names += tar.getnames()
    assert names and all(n.endswith((".npy", ".json")) for n in names)
    assert all(n.count(".") == 2 or n.endswith(".meta.json") for n in names)


def test_keys_with_dots_and_inconsistent_shapes_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    with ShardSetWriter(tmp_path, new_manifest()) as writer:
        record, _ = make_record("photo.jpg", 2, rng)
        with pytest.raises(ShardSetError, match="no dots"):
            writer.write(record)
        record, _ = make_record("photo", 2, rng)
        record.iou_preds = record.iou_preds[:1]
        with pytest.raises(ShardSetError, match="'iou_preds' has shape"):
            writer.write(record)


def test_interrupted_writer_resumes_without_loss_or_duplicates(tmp_path):
    rng = np.random.default_rng(2)
    records = [make_record(f"img-{i}", 3, rng)[0] for i in range(7)]
    with pytest.raises(KeyboardInterrupt):
        with ShardSetWriter(tmp_path, new_manifest(), images_per_shard=3) as writer:
            for record in records[:5]:
                writer.write(record)
            raise KeyboardInterrupt
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ShardSetError, match="interrupted"):
        read_manifest(tmp_path)
    with ShardSetWriter(tmp_path, new_manifest(), images_per_shard=3) as writer:
        assert writer.done_keys == {f"img-{i}" for i in range(5)}
        with pytest.raises(ShardSetError, match="already in"):
            writer.write(records[0])
        for record in records:
            if record.key not in writer.done_keys:
                writer.write(record)
    keys = [r.key for r in iter_records(tmp_path)]
    assert sorted(keys) == sorted(r.key for r in records) and len(keys) == len(set(keys))
    assert read_manifest(tmp_path).num_masks == 21
    with pytest.raises(ShardSetError, match="already holds a finished shard set"):
        ShardSetWriter(tmp_path, new_manifest())


def make_datamodule(shard_sets, **kwargs) -> ShardDataModule:
    datamodule = synthetic_datamodule(shard_sets, **kwargs)
    datamodule.setup("fit")
    return datamodule


def loader_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["keys"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_image_read_exactly_once(shard_sets, workers):
    datamodule = make_datamodule(shard_sets, num_workers=workers)
    expected = sorted(r.key for r in iter_records(shard_sets["val"]))
    val_keys = loader_keys(datamodule.val_dataloader())
    assert sorted(val_keys) == expected and len(val_keys) == len(set(val_keys))
    if workers == 0:
        assert val_keys == [r.key for r in iter_records(shard_sets["val"])]  # deterministic order
    train_keys = loader_keys(datamodule.train_dataloader())
    expected_train = sorted(r.key for r in iter_records(shard_sets["train"]))
    assert sorted(train_keys) == expected_train


def test_training_order_is_shuffled(shard_sets):
    datamodule = make_datamodule(shard_sets)
    stored = [r.key for r in iter_records(shard_sets["train"])]
    assert loader_keys(datamodule.train_dataloader()) != stored


def test_ddp_ranks_see_disjoint_images_and_stay_in_step(shard_sets, monkeypatch):
    manifest = read_manifest(shard_sets["train"])
    seen, trained, batch_sizes = [], [], []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        datamodule = make_datamodule(shard_sets)
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        seen.append(loader_keys(datamodule.val_dataloader()))
        batches = list(datamodule.train_dataloader())
        trained.append({key for batch in batches for key in batch["keys"]})
        batch_sizes.append([len(batch["keys"]) for batch in batches])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(r.key for r in iter_records(shard_sets["val"]))
    assert not trained[0] & trained[1]  # each rank reads its own shards
    expected_batches = -(-manifest.num_images // (2 * 4))
    assert batch_sizes == [[4] * expected_batches] * 2  # same count, full batches: in step


def test_every_rank_needs_images_but_not_a_shard(tmp_path, shard_sets):
    """64 ranks of 96 training and 32 held-out images: a rank would read 1 training image,
    no full batch of 4, and no held-out one; 8 ranks read by image where a set has fewer
    shards."""
    datamodule = make_datamodule(shard_sets)
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=64)
    for loader, fewest in ((datamodule.val_dataloader, 0), (datamodule.train_dataloader, 1)):
        with pytest.raises(ShardSetError, match=rf"one of 64 ranks may read only {fewest},"):
            loader()
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=8)
    assert len(read_manifest(shard_sets["val"]).shards) < 8
    assert len(loader_keys(datamodule.val_dataloader())) == 32 // 8


def test_collate_pads_with_a_validity_mask(shard_sets):
    datamodule = make_datamodule(shard_sets, batch_size=6)
    batch = next(iter(datamodule.val_dataloader()))
    records = {r.key: r for r in iter_records(shard_sets["val"])}
    counts = [records[k].num_masks for k in batch["keys"]]
    assert batch["embeddings"].shape == (6, max(counts), 1024)
    assert batch["valid"].sum(1).tolist() == counts
    assert batch["labels"].shape == (6, len(SMALL_CLASSES))
    first = records[batch["keys"][0]]
    np.testing.assert_array_equal(batch["embeddings"][0, : counts[0]].numpy(), first.embeddings)
    assert not batch["embeddings"][batch["valid"] == 0].any()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"classes": ["cat", "dog", "car", "bus"]},
            r"class list differs .*only in the run: \['bus'\]",
        ),
        ({"classes": ["dog", "cat", "car", "boat"]}, "same names in another order"),
        ({"embed_dim": 256}, r"embedding dim differs \(run: 256, shards: 1024\)"),
        ({"sam_model_type": "vit_h"}, r"SAM model type differs \(run: vit_h, shards: tiny\)"),
    ],
)
def test_mismatched_manifest_fails_with_its_message(shard_sets, override, message):
    with pytest.raises(ShardSetError, match=message):
        make_datamodule(shard_sets, **override)


def test_missing_real_shard_set_names_the_directory_and_key(tmp_path):
    datamodule = ShardDataModule(
        classes="voc20",
        train_dir=str(tmp_path / "nope"),
        val_dir=str(tmp_path / "nope2"),
        source="sd",
    )
    with pytest.raises(ShardSetError, match=r"no train shard set at .*nope \(data.train_dir\)"):
        datamodule.prepare_data()


def test_synthetic_sets_are_reproducible_and_marked(tmp_path):
    for name in ("a", "b"):
        write_synthetic_shard_set(
            tmp_path / name, classes=["cat", "dog"], images_per_class=3, seed=5
        )
    first, second = (list(iter_records(tmp_path / n)) for n in ("a", "b"))
    for left, right in zip(first, second, strict=True):
        np.testing.assert_array_equal(left.embeddings, right.embeddings)
    manifest = read_manifest(tmp_path / "a")
    assert manifest.synthetic and manifest.provenance.random_weights
    assert collections.Counter(tuple(r.labels) for r in first)[(1, 0)] >= 2


def test_writers_of_one_file_at_once_each_replace_it_whole(tmp_path):
    """DDP ranks write a shard set's pending.json at the same moment: with one shared
    temporary name, one writer's replace found the file another had moved (seen as a rank
    failing to start extraction). Each writer now stages under a name of its own."""
    path = tmp_path / "pending.json"
    texts = [json.dumps({"writer": i, "pad": "x" * 4096}) for i in range(8)]
    failures = []

    def write_often(text: str) -> None:
        try:
            for _ in range(200):
                atomic_write_text(path, text)
        except OSError as error:
            failures.append(error)

    threads = [threading.Thread(target=write_often, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert path.read_text() in texts  # one writer's text, whole
    assert [p.name for p in tmp_path.iterdir()] == ["pending.json"]  # nothing staged is left
