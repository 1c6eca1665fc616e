"""Score the head being trained on an evaluation shard set during ``fit`` and ``test``.

At the end of every ``every_n_epochs``-th validation epoch during fit (not the
sanity check), of ``Trainer.validate`` and of ``Trainer.test``, the module's
current head runs through :func:`usam.evaluation.scoring.evaluate`; every scalar
of the metric collection (``val/mIoU``, ``val/mAP50``, ``val/iou/<class>``,
``val/ap50/<class>``...; ``test/...`` when testing) is logged through the module,
so checkpointing and early stopping can monitor them.
Overlays of a fixed sample of images go to W&B as a table, or to PNGs under
``output_dir`` when no W&B logger is attached; the test-time results (the final
head) are always written there as well.

Under DDP every rank scores its share of the images (the loaders' rule), and the metric
collection reduces over the ranks, so every rank logs the one-process values and a large
set (COCO val2017) finishes in a world_size-th of the time, within the process group's
timeout; files, W&B tables and overlays (of rank zero's images) come from rank zero.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from usam.core.config import ConfigError
from usam.core.vocabulary import Vocabulary
from usam.data.rank_shares import RankShare
from usam.data.sources import ImageSource
from usam.evaluation.reports import log_to_wandb, write_outputs
from usam.evaluation.scoring import Evaluation, check_eval_set, evaluate, resolve_vocabulary
from usam.formats import storage
from usam.formats.embedding_shards import ShardSetError, read_manifest
from usam.inference.predictor import HeadCheckpoint, InferenceSettings, Predictor


class EvaluationCallback(Callback):
    def __init__(
        self,
        shards_dir: str | Path,
        source: ImageSource | None = None,
        inference: InferenceSettings | None = None,
        every_n_epochs: int = 1,
        num_overlays: int = 8,
        vocabulary: str | None = None,
        output_dir: str | Path | None = None,
    ) -> None:
        """``shards_dir`` is an eval shard set's ``eval`` folder (``usam.eval`` prints it);
        ``source`` the image source it was made from, for the overlays' pixels."""
        if every_n_epochs < 1:
            raise ConfigError(f"every_n_epochs={every_n_epochs} must be at least 1")
        self.shards_dir = storage.location(shards_dir)  # a folder or a URL
        self.source = source
        self.settings = inference or InferenceSettings()
        self.every_n_epochs = every_n_epochs
        self.num_overlays = num_overlays
        self.vocabulary_spec = vocabulary
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.vocabulary: Vocabulary | None = None

    def _predictor(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Predictor:
        """A predictor around the live head (no copy, no checkpoint file)."""
        checkpoint = HeadCheckpoint(pl_module.head, pl_module.metadata())
        return Predictor(checkpoint, self.settings, pl_module.device)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fail before training when the eval set is missing or does not fit the head."""
        try:
            manifest = read_manifest(self.shards_dir)
        except ShardSetError as error:
            raise ShardSetError(
                f"{error}\nThe evaluation callback needs an eval shard set at "
                f"callbacks.eval.shards_dir={self.shards_dir}: `python -m usam.eval "
                "eval_data=<dataset> sam=<this run's sam>` (without ckpt) extracts one and "
                "prints its folder."
            ) from error
        predictor = self._predictor(trainer, pl_module)
        self.vocabulary = resolve_vocabulary(predictor.classes, self.vocabulary_spec)
        check_eval_set(manifest, self.shards_dir, predictor, self.vocabulary)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        due = (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if due or trainer.state.fn == TrainerFn.VALIDATING:
            self._run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module, "test")

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        head = pl_module.head
        was_training = head.training
        head.eval()
        try:
            evaluation = evaluate(
                self.shards_dir,
                self._predictor(trainer, pl_module),
                vocabulary=self.vocabulary,
                num_samples=self.num_overlays,
                source=self.source,
                share=RankShare(trainer.global_rank, trainer.world_size),
            )
        finally:
            head.train(was_training)
        for name, value in _scores(evaluation).items():
            # reduced, so equal on every rank; sync_dist only keeps Lightning's DDP check quiet
            pl_module.log(f"{prefix}/{name}", value, sync_dist=True)
        if trainer.is_global_zero:
            self._publish(trainer, evaluation, prefix)

    def _publish(self, trainer: L.Trainer, evaluation: Evaluation, prefix: str) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for logger in wandb_loggers:
            extra = {"trainer/global_step": trainer.global_step}
            log_to_wandb(logger.experiment, evaluation, prefix, extra)
        if not wandb_loggers or prefix == "test":  # the final scores always land as files too
            root = self.output_dir or Path(trainer.default_root_dir) / "eval"
            write_outputs(evaluation, root / _folder_name(trainer, prefix))


def _folder_name(trainer: L.Trainer, prefix: str) -> str:
    """``test-<checkpoint name>`` for a tested checkpoint (its epoch, not the trainer's);
    ``<prefix>-epoch<N>`` for the live head."""
    if prefix == "test" and trainer.ckpt_path:
        return f"test-{Path(trainer.ckpt_path).stem}"
    return f"{prefix}-epoch{trainer.current_epoch:03d}"


def _scores(evaluation: Evaluation) -> dict[str, float]:
    """The evaluation's scalars, and ``eval/random_weights``: whether the evaluation masks or
    the head come from random weights."""
    return evaluation.scalars() | evaluation.provenance.scalars("eval")
