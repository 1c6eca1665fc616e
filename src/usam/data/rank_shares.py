"""Which images of a shard set one DDP rank reads: the rule every loader and evaluation share.

WebDataset splits a set over ranks by shard, which needs a shard per rank, and the
held-out sets that extraction writes by default have few (VOC's ~200 validation images
make 7 shards; 2 nodes x 8 GPUs are 16 ranks). With at least as many shards as ranks, a
rank reads every ``world_size``-th shard, so each shard is read once in all; with fewer,
every rank reads every shard and keeps every ``world_size``-th image of it, so only the
small sets are read ``world_size`` times. Either way the ranks' images are disjoint and
together the whole set, in both cases split further over loader workers by shard.

The rank and world size are those the trainer reports in the main process, carried into
the loader workers with the pipeline: a worker started by spawn has no process group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import webdataset as wds


@dataclass(frozen=True)
class RankShare:
    """Rank ``rank`` of ``world_size`` (one process: rank 0 of 1, which reads all)."""

    rank: int = 0
    world_size: int = 1

    def by_shard(self, num_shards: int) -> bool:
        """Whether ranks read whole shards of a set of ``num_shards`` (else every shard)."""
        return num_shards >= self.world_size

    def samples(self, urls: Sequence[str]) -> list[Any]:
        """WebDataset stages yielding this rank's raw samples of ``urls``, in their order
        (split further by shard inside a loader worker).

        Every rank must list the same ``urls`` in the same order (a shuffled training list
        is shuffled alike on every rank), and its loader must have the same number of
        workers, or the ranks' parts would overlap.
        """
        split = self.world_size > 1
        whole_shards = self.by_shard(len(urls))
        keep_every_nth = wds.slice(self.rank, None, self.world_size)
        stages = [
            wds.SimpleShardList(list(urls)),
            keep_every_nth if split and whole_shards else None,
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            keep_every_nth if split and not whole_shards else None,
        ]
        return [stage for stage in stages if stage is not None]

    def fewest_images(self, shard_images: Sequence[int]) -> int:
        """The fewest images a rank reads of shards holding ``shard_images`` each, whatever
        order they are listed in (training shuffles it every epoch)."""
        if not self.by_shard(len(shard_images)):
            return sum(shard_images) // self.world_size
        return sum(sorted(shard_images)[: len(shard_images) // self.world_size])

    def shards_read(self, num_shards: int) -> int:
        """How many of ``num_shards`` shards this rank reads, at most."""
        if self.by_shard(num_shards):
            return math.ceil(num_shards / self.world_size)
        return num_shards

    def workers(self, wanted: int, num_shards: int) -> int:
        """Loader workers worth starting: no more than the shards this rank reads, since
        workers split those by shard. The same on every rank, as ``samples`` needs."""
        return min(wanted, self.shards_read(num_shards))
