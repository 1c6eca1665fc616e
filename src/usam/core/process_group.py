"""Leaving a DDP process group at the end of a command's work on every rank."""

from __future__ import annotations

import torch.distributed as dist


def leave_process_group() -> None:
    """Every rank leaves the process group together while all are alive, rather than in
    the interpreter's exit handlers, where a rank was seen to abort ("terminate called
    without an active exception") as the other one went: fit's ranks, and the ranks
    ``usam.eval trainer.devices=N`` spawns."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
