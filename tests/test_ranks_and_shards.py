"""Any number of DDP ranks and loader workers reads a shard set at the default shard size:
each rank a disjoint part, together all of it, training ranks in step, even where a set has
fewer shards than ranks (the held-out sets that extraction writes by default)."""

from __future__ import annotations

import itertools
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from usam.data.datamodule import ShardDataModule
from usam.data.eval_shards import rank_records
from usam.data.rank_shares import RankShare
from usam.formats.embedding_shards import ShardSetError, iter_records, read_manifest
from usam.testing.synthetic import write_synthetic_shard_set

from helpers.commands import ROOT, compose_config
from helpers.rank_keys import read_rank_keys

VOC = [f"class{i:02d}" for i in range(20)]
DEFAULT_SHARD = compose_config("fit", []).extract.images_per_shard


def voc_shaped(root: Path, train_per_class: int, images_per_shard: int = DEFAULT_SHARD) -> Path:
    """20 classes, ``train_per_class`` training images each and one held-out image each,
    written as extraction writes them (full-size embeddings, as ``usam.fit`` reads them)."""
    for split, per_class in (("train", train_per_class), ("val", 1)):
        write_synthetic_shard_set(
            root / split,
            classes=VOC,
            split=split,
            images_per_class=per_class,
            masks_per_image=(2, 6),
            images_per_shard=images_per_shard,
        )
    return root


def as_rank(root: Path, rank: int, world_size: int, **settings) -> ShardDataModule:
    """The DataModule as rank ``rank`` of ``world_size`` sees it: the trainer is where it
    reads its rank from."""
    module = ShardDataModule(
        VOC, str(root / "train"), str(root / "val"), source="synthetic", **settings
    )
    module.setup("fit")
    module.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    return module


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch]


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory) -> Path:
    """80 training images in 3 shards (32, 32, 16), 20 held out in 1: fewer than 4 ranks."""
    return voc_shaped(tmp_path_factory.mktemp("few"), train_per_class=4)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    """The same counts in shards of 4: more shards than ranks, read whole."""
    return voc_shaped(tmp_path_factory.mktemp("many"), train_per_class=4, images_per_shard=4)


# (set, world size, loader workers, whether every rank's part fills whole batches of 4, so
# that one training epoch reads every image)
CASES = [
    ("few_shards", 2, 0, False),
    ("few_shards", 3, 0, False),
    ("few_shards", 4, 0, True),
    ("few_shards", 4, 2, True),
    ("many_shards", 2, 2, True),
    ("many_shards", 3, 0, False),
    ("many_shards", 4, 0, True),
]


@pytest.mark.parametrize(("shards", "world_size", "workers", "whole_batches"), CASES)
def test_ranks_read_disjoint_parts_that_make_up_the_set(
    shards, world_size, workers, whole_batches, request
):
    root = request.getfixturevalue(shards)
    modules = [
        as_rank(root, r, world_size, batch_size=4, num_workers=workers) for r in range(world_size)
    ]
    everything = {split: {r.key for r in iter_records(root / split)} for split in ("train", "val")}

    held_out = [keys_of(b["keys"] for b in module.val_dataloader()) for module in modules]
    assert sorted(keys_of(held_out)) == sorted(everything["val"])  # each image once
    scored = [
        [r.key for r in rank_records(root / "val", RankShare(rank, world_size))]
        for rank in range(world_size)
    ]
    assert [sorted(part) for part in scored] == [sorted(part) for part in held_out]

    batches = [[b["keys"] for b in module.train_dataloader()] for module in modules]
    in_step = math.ceil(80 / (world_size * 4))
    assert [len(rank) for rank in batches] == [in_step] * world_size
    assert all(len(batch) == 4 for rank in batches for batch in rank)
    parts = [set(keys_of(rank)) for rank in batches]
    assert all(not a & b for a, b in itertools.combinations(parts, 2))
    assert set().union(*parts) <= everything["train"]
    if whole_batches:
        assert set().union(*parts) == everything["train"]


def test_fewer_shards_than_ranks_are_read_by_image_and_enough_by_shard(few_shards, many_shards):
    """Where there are enough shards each is read by one rank alone (once in all); only a
    set with fewer shards than ranks is read by every rank."""
    share = RankShare(1, 4)
    assert share.by_shard(4) and not share.by_shard(3)
    assert share.shards_read(20) == 5 and share.shards_read(3) == 3
    assert share.workers(8, 20) == 5 and share.workers(2, 3) == 2 and share.workers(2, 1) == 1
    assert share.fewest_images([32, 32, 16]) == 80 // 4  # every rank reads every shard
    assert RankShare(0, 2).fewest_images([32, 32, 16]) == 16  # the smallest shard alone
    assert RankShare(0, 3).fewest_images([5, 9, 1, 7, 2, 8, 6]) == 1 + 2  # 2 or 3 shards each
    assert len(read_manifest(few_shards / "val").shards) == 1 < share.world_size


def test_a_rank_that_could_run_out_of_batches_is_refused_by_name(tmp_path):
    """Three ranks of a 20-image training set, batches of 8: a rank reads 6 images, never a
    full batch, and would end its epoch while the others wait for it; 21 ranks of the
    20 held-out images leave one without any."""
    root = voc_shaped(tmp_path, train_per_class=1)
    with pytest.raises(ShardSetError, match=r"may read only 6, and needs 8 .*data\.batch_size=8"):
        as_rank(root, 0, 3, batch_size=8).train_dataloader()
    as_rank(root, 0, 3, batch_size=6).train_dataloader()  # 6 images fill a batch of 6
    with pytest.raises(ShardSetError, match=r"holds 20 images: one of 21 ranks may read only 0"):
        as_rank(root, 0, 21).val_dataloader()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fit_command(root: Path, keys: Path, *extra: str, batch_size: int = 4) -> list[str]:
    """The README's DDP command on the CPU over the shard sets in ``root``, every rank
    writing the keys of its batches under ``keys``."""
    return [
        *(sys.executable, "-m", "usam.fit", "data=synthetic", f"data.classes=[{','.join(VOC)}]"),
        *(f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}"),
        f"data.batch_size={batch_size}",
        *("trainer=ddp", "trainer.accelerator=cpu", "trainer.max_epochs=1", "stage=teacher"),
        *("logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"),
        "+callbacks.rank_keys._target_=helpers.rank_keys.RankKeys",
        f"+callbacks.rank_keys.out={keys}",
        *extra,
    ]


def start(command: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), **env},
    )


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=900)  # ends a hang only
    assert process.returncode == 0, output[-4000:]


def assert_ranks_split_every_loop(root: Path, keys: Path, world_size: int) -> None:
    """Train, validation and test: in every epoch each rank read images no other rank read,
    together all of them; training ranks ran the same number of batches."""
    everything = {
        split: sorted(r.key for r in iter_records(root / split)) for split in ("train", "val")
    }
    ranks = read_rank_keys(keys, world_size)
    for loop, split in (("train", "train"), ("val", "val"), ("test", "val")):
        epochs = [rank[loop] for rank in ranks]
        assert {len(rank_epochs) for rank_epochs in epochs} == {1}, (loop, epochs)
        parts = [keys_of(rank_epochs[0]) for rank_epochs in epochs]
        assert all(parts), (loop, parts)
        assert sorted(keys_of(parts)) == everything[split], loop  # each image once
    train_batches = [len(rank["train"][0]) for rank in ranks]
    assert train_batches == [train_batches[0]] * world_size


def test_two_ranks_fit_validate_and_test_with_fewer_shards_than_ranks(tmp_path):
    """The issue's command: the held-out set, 1 shard at the default size, and a training
    set of 1 shard too, on 2 ranks."""
    root = voc_shaped(tmp_path / "shards", train_per_class=1)
    assert len(read_manifest(root / "train").shards) == len(read_manifest(root / "val").shards) == 1
    command = fit_command(root, tmp_path / "keys", "trainer.devices=2", batch_size=5)
    finish(start(command, tmp_path / "run"))
    assert_ranks_split_every_loop(root, tmp_path / "keys", 2)


@pytest.mark.slow
def test_four_ranks_on_one_machine_train_validate_and_test_at_the_default_shard_size(tmp_path):
    """``trainer=ddp trainer.devices=4`` with 2 loader workers a rank: 3 training shards and
    1 held-out shard for 4 ranks."""
    root = voc_shaped(tmp_path / "shards", train_per_class=4)
    assert len(read_manifest(root / "train").shards) == 3
    command = fit_command(root, tmp_path / "keys", "trainer.devices=4", "data.num_workers=2")
    finish(start(command, tmp_path / "run"))
    assert_ranks_split_every_loop(root, tmp_path / "keys", 4)


@pytest.mark.slow
def test_two_nodes_of_two_ranks_train_validate_and_test_at_the_default_shard_size(tmp_path):
    """The README's multi-node command, 2 "nodes" on this machine: the same command started
    once per node with ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; Lightning starts
    each node's second rank."""
    root = voc_shaped(tmp_path / "shards", train_per_class=4)
    command = fit_command(root, tmp_path / "keys", "trainer.devices=2", "trainer.num_nodes=2")
    port = str(free_port())
    nodes = [
        start(
            command,
            tmp_path / f"node{node}",
            NODE_RANK=str(node),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        finish(node)
    assert_ranks_split_every_loop(root, tmp_path / "keys", 4)
