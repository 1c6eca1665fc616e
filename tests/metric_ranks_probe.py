"""Run by tests/test_metrics.py: the metric collection fed on 2 CPU ranks (gloo).

Rank ``r`` updates with images ``r, r + 2, ...`` of :func:`helpers.metric_cases.random_images`
and computes, which reduces the states over both ranks; rank zero writes the scores.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from usam.evaluation.metrics import metric_collection

from helpers.metric_cases import METRIC_CLASSES, random_images

WORLD_SIZE = 2


def rank_main(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        metrics = metric_collection(METRIC_CLASSES)
        for image in random_images()[rank::WORLD_SIZE]:
            metrics.update(**image)
        scores = metrics.compute()
        if rank == 0:
            out.write_text(json.dumps(scores))
    finally:
        dist.destroy_process_group()


def main(out: Path) -> None:
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(rank_main, args=(port, out), nprocs=WORLD_SIZE)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
