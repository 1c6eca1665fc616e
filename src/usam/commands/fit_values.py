"""The trainer and data values of a fit run, checked as every other setting is, before any
image, shard or rank is made: a mistyped or out-of-range one (``trainer.max_epochs=abc``,
``data.batch_size=-3``) is one line naming the key, not a traceback from inside Lightning
or a loader once the process group has started."""

from __future__ import annotations

from omegaconf import DictConfig

from usam.core.config import Count, check_target_arguments

ALL = ((-1, "all"),)
NO_LIMIT = ((-1, "no limit"),)
# Lightning's Trainer: the counts it takes (its annotations give the types)
TRAINER_COUNTS = {
    "devices": Count(1, ALL),
    "num_nodes": Count(1),
    "max_epochs": Count(1, NO_LIMIT),
    "min_epochs": Count(0),
    "max_steps": Count(1, NO_LIMIT),
    "log_every_n_steps": Count(1),
    "check_val_every_n_epoch": Count(1),
    "accumulate_grad_batches": Count(1),
    "num_sanity_val_steps": Count(0, ALL),
}
# the DataModule's (data.shuffle_buffer: images held per loader worker)
DATA_COUNTS = {
    "batch_size": Count(1),
    "num_workers": Count(0),
    "shuffle_buffer": Count(1),
    "embed_dim": Count(1),
}


def check_fit_values(cfg: DictConfig) -> None:
    """The ``trainer`` and ``data`` groups against what their ``_target_`` takes."""
    check_target_arguments(cfg.trainer, "trainer", TRAINER_COUNTS)
    check_target_arguments(cfg.data, "data", DATA_COUNTS)
