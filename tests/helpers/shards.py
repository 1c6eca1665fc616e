"""Small synthetic shard sets for the training tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L

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
