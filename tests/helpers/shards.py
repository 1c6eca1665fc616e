"""Small synthetic shard sets for the training tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from pycocotools import mask as mask_utils

from usam.data.datamodule import ShardDataModule
from usam.formats.embedding_shards import ImageRecord

SMALL_CLASSES = ["cat", "dog", "car", "boat"]


def synthetic_datamodule(shard_sets: dict[str, Path], **kwargs) -> ShardDataModule:
    """A DataModule over the ``shard_sets`` fixture (SMALL_CLASSES, tiny SAM)."""
    args = {
        "classes": SMALL_CLASSES,
        "train_dir": str(shard_sets["train"]),
        "val_dir": str(shard_sets["val"]),
        "source": "synthetic",
        "sam_model_type": "tiny",
        "batch_size": 4,
    }
    return ShardDataModule(**{**args, **kwargs})


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A CPU Trainer that writes and prints nothing but what a test asks for."""
    args = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    args.update(kwargs)
    return L.Trainer(**args)


def record_of_masks(key: str, masks, shape, ground_truth: dict, rng) -> ImageRecord:
    """An eval record of an image of ``shape`` whose masks are ``masks`` (bool arrays), with
    random tokens and no SAM scores: for scoring tests that choose the proposals themselves."""
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    count, (height, width) = len(masks), shape
    return ImageRecord(
        key=key,
        height=height,
        width=width,
        embeddings=rng.standard_normal((count, 1024)).astype(np.float16),
        iou_preds=np.ones(count, np.float32),
        stability=np.ones(count, np.float32),
        boxes=np.zeros((count, 4), np.float32),
        points=np.zeros((count, 2), np.float32),
        multimask=np.zeros(count, np.int8),
        rles=[r["counts"].decode() for r in rles],
        ground_truth=ground_truth,
    )
