"""Run by tests/test_ddp.py: Lightning DDP on 2 CPU processes over synthetic shards.

Each rank writes ``rank<r>.json`` with the image keys of every training batch per
epoch and its final validation metrics; rank zero saves the trained head.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from usam.data.datamodule import ShardDataModule
from usam.train.lightning_modules import TeacherModule


class KeyRecorder(Callback):
    def __init__(self) -> None:
        self.epochs: list[list[list[str]]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.epochs[-1].append(list(batch["keys"]))


def main(shards: Path, out: Path) -> None:
    L.seed_everything(0)
    datamodule = ShardDataModule(
        ["cat", "dog", "car", "boat"],
        str(shards / "train"),
        str(shards / "val"),
        source="synthetic",
        sam_model_type="tiny",
        batch_size=4,
    )
    recorder = KeyRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        num_sanity_val_steps=0,
    )
    module = TeacherModule(datamodule.classes, sam_model_type="tiny")
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    result = {"rank": trainer.global_rank, "epochs": recorder.epochs, "metrics": metrics}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    trainer.save_checkpoint(out / "head.ckpt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
