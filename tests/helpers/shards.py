"""Small synthetic shard sets for the training tests."""

from __future__ import annotations

from pathlib import Path

from usam.data.datamodule import ShardDataModule

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
