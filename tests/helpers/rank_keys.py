"""A callback a test adds to ``usam.fit`` (``+callbacks.rank_keys``): each rank writes the
image keys of every batch it ran, so the test can see which images each rank read."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback

LOOPS = ("train", "val", "test")


class RankKeys(Callback):
    """``<out>/rank<global rank>.json``: for each loop, per epoch, the keys of each batch
    (validation without the sanity check, which reads only its first batches)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.epochs: dict[str, list[list[list[str]]]] = {loop: [] for loop in LOOPS}

    def _start(self, trainer, loop: str) -> None:
        if not trainer.sanity_checking:
            self.epochs[loop].append([])

    def _batch(self, trainer, loop: str, batch) -> None:
        if not trainer.sanity_checking:
            self.epochs[loop][-1].append(list(batch["keys"]))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, "train")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch(trainer, "train", batch)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, "val")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *_) -> None:
        self._batch(trainer, "val", batch)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, "test")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, *_) -> None:
        self._batch(trainer, "test", batch)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """After fit and again after test: the last write holds every loop."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.epochs))


def read_rank_keys(out: Path, world_size: int) -> list[dict[str, list[list[list[str]]]]]:
    """What each rank wrote, by global rank."""
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world_size)]
