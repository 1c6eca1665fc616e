"""The ``eval_data`` group, read once for ``usam.eval`` and ``usam.fit``: its shard set."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from usam.data.eval_shards import eval_shards
from usam.data.extraction import ExtractSettings
from usam.data.sources import ImageSource
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings


def eval_data_shards(
    cfg: DictConfig,
    source: ImageSource,
    sam: SamSettings,
    amg: AmgSettings,
    extract: ExtractSettings,
) -> Path:
    """The ``eval`` folder of ``cfg.eval_data``'s shard set (made from ``source``, the
    dataset built from ``cfg.eval_data.source``), extracted first when missing."""
    return eval_shards(
        cfg.eval_data.name,
        source,
        Path(cfg.paths.data_dir),
        sam,
        amg,
        extract,
        shards_dir=cfg.eval_data.shards_dir,
        config={"eval_data": OmegaConf.to_container(cfg.eval_data, resolve=True)},
    )
