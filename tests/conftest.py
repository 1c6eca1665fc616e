"""Shared fixtures: offline, single-threaded, and small synthetic shard sets in tmp dirs."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from usam.data.eval_datasets import VOCSegmentation  # noqa: E402
from usam.data.extraction import extract  # noqa: E402
from usam.sam.registry import build_sam  # noqa: E402
from usam.sam.sam1_backend import AutomaticMaskEngine  # noqa: E402
from usam.testing.synthetic import write_synthetic_shard_set  # noqa: E402

from helpers.evaluation import AMG, FAST, write_voc  # noqa: E402
from helpers.shards import SMALL_CLASSES  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shard_sets(tmp_path_factory) -> dict[str, Path]:
    """A train and a val synthetic shard set over SMALL_CLASSES (several shards each)."""
    root = tmp_path_factory.mktemp("shards")
    sets = {}
    for split, per_class in (("train", 24), ("val", 8)):
        sets[split] = root / split
        write_synthetic_shard_set(
            sets[split],
            classes=SMALL_CLASSES,
            split=split,
            images_per_class=per_class,
            masks_per_image=(6, 20),
            images_per_shard=10,
            seed=3,
        )
    return sets


@pytest.fixture(scope="module")
def voc_set(tmp_path_factory) -> tuple[VOCSegmentation, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    source = VOCSegmentation(write_voc(root / "VOC2012"), "val")
    sam, info = build_sam("tiny")
    extract(source, root / "shards", AutomaticMaskEngine(sam, AMG), info, trainer_args=FAST)
    return source, root / "shards" / "eval"
