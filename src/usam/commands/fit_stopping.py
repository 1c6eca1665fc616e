"""Stopping ``usam.fit`` on SIGTERM (preemption) or SIGINT and resuming it at an epoch boundary.

Every epoch's end leaves ``checkpoints/<stage>/resume.ckpt``; a stop request ends the run
after the batch in progress with the line and exit code of the other commands
(:mod:`usam.core.stopping`), and the same command, in the same run folder, starts each
stage from its ``resume.ckpt``. The epoch in progress is trained again rather than
continued: the training stream is an iterable that Lightning cannot rewind mid-epoch, while
an epoch restarts exactly (its shard and sample order come from ``data.seed`` and the
epoch), so the resumed run ends with the head an uninterrupted run ends with.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from usam.core.stopping import Stopped, requested_signal, stoppable
from usam.data.datamodule import stream_seed

RESUME_CHECKPOINT = "resume.ckpt"


def resume_checkpoint(stage_dir: Path) -> Path | None:
    """The checkpoint a stage resumes from: its last finished epoch, if any."""
    path = stage_dir / RESUME_CHECKPOINT
    return path if path.is_file() else None


class EpochResume(Checkpoint):
    """Writes ``resume.ckpt`` at every epoch's end, stops at a batch boundary once a stop
    was requested, and seeds torch from (seed, epoch) as each epoch's first batch starts, so
    that dropout draws the same in an epoch a resumed run trains as in one that was never
    stopped. A ``Checkpoint``, listed after the ``ModelCheckpoint``: Lightning runs it after
    them, so the state it saves knows their files of that epoch."""

    def __init__(self, stage_dir: Path, seed: int) -> None:
        self.path = stage_dir / RESUME_CHECKPOINT
        self.seed = seed
        self.stop_handler = signal.getsignal(signal.SIGTERM)  # stoppable's, inside fit

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        """Lightning's SIGTERM handler broadcasts from inside the handler, a collective that
        meets whichever one another rank is in at that moment (seen to close gloo's
        connection under SLURM, where every task gets the signal). This one only records
        the stop, which the ranks decide on together at a batch end, and passes the signal
        on to the ranks Lightning launched, as Lightning's does."""
        stop, launcher = self.stop_handler, trainer.strategy.launcher
        if not callable(stop) or threading.current_thread() is not threading.main_thread():
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            stop(signum, frame)
            if launcher is not None:
                launcher.kill(signum)

        signal.signal(signal.SIGTERM, on_sigterm)

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            torch.manual_seed(stream_seed(self.seed, trainer.current_epoch))

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        self._stop_if_requested(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, *_: Any) -> None:
        partial = self.path.with_suffix(".partial")  # a kill while writing keeps the last one
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            os.replace(partial, self.path)
        self._stop_if_requested(trainer)

    @staticmethod
    def _stop_if_requested(trainer: L.Trainer) -> None:
        """Every rank decides together (one rank alone stopping would leave the others
        waiting for its gradients); a rank the signal did not reach reports SIGTERM."""
        signum = requested_signal()
        if trainer.strategy.reduce_boolean_decision(signum is not None, all=False):
            raise Stopped(signum or signal.SIGTERM)


def cluster_plugins() -> dict[str, Any]:
    """Trainer arguments for the cluster: under SLURM, Lightning's ``SLURMEnvironment``
    without its auto-requeue, whose SIGUSR1 checkpoint lands mid-epoch in the run folder
    both stages share (the student stage would load a teacher's). SIGTERM stops the job
    here, and the job script requeues it (docs/clusters.md)."""
    if not SLURMEnvironment.detect():
        return {}
    return {"plugins": [SLURMEnvironment(auto_requeue=False)]}


def epochs_done(output_dir: Path, max_epochs: int) -> str:
    """What a stopped run keeps, per stage that has begun: its finished epochs."""
    kept = []
    for stage_dir in sorted((output_dir / "checkpoints").glob("*")):
        path = resume_checkpoint(stage_dir)
        if path is None:
            kept.append(f"{stage_dir.name}: no epoch finished")
            continue
        epoch = torch.load(path, map_location="cpu", weights_only=False)["epoch"]
        kept.append(f"{stage_dir.name}: {epoch + 1} of {max_epochs} epochs kept in {path}")
    return "; ".join(kept) or "no epoch finished"


@contextmanager
def stoppable_fit(output_dir: Path, max_epochs: int) -> Iterator[None]:
    """fit's stages inside :func:`usam.core.stopping.stoppable`; the resume line names the
    run folder (absolute), since a new run would otherwise start in a new one. Lightning's
    own SIGTERM stop (between ranks, or in validation) becomes the same stop."""
    folder = f"paths.output_dir={output_dir.resolve()}"
    with stoppable("fit", lambda: epochs_done(output_dir, max_epochs), [folder], unit="batch"):
        try:
            yield
        except SIGTERMException as stop:
            raise Stopped(signal.SIGTERM) from stop
