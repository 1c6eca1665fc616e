"""The embedding shard set of an evaluation dataset, shared by ``usam.eval`` and ``usam.fit``.

It is extracted on demand and cached under ``<data_dir>/shards`` by the id of its
images, SAM and mask settings, so every later evaluation with the same SAM reuses it.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from usam.data.extraction import (
    ExtractSettings,
    require_masks,
    run_extraction,
    shard_set_dir,
)
from usam.data.sources import ImageSource
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings


def eval_shards(
    eval_data: DictConfig,
    source: ImageSource,
    data_dir: Path,
    sam: SamSettings,
    amg: AmgSettings,
    extract: ExtractSettings,
) -> Path:
    """The ``eval`` folder of ``eval_data``'s shard set, extracted first when missing."""
    out_dir = (
        Path(eval_data.shards_dir)
        if eval_data.shards_dir
        else shard_set_dir(data_dir / "shards", f"eval-{eval_data.name}", source, sam, amg, 0.0)
    )
    manifests = run_extraction(
        source,
        out_dir,
        sam,
        amg,
        extract,
        config={"eval_data": OmegaConf.to_container(eval_data, resolve=True)},
    )
    require_masks(manifests["eval"], out_dir / "eval", amg)
    return out_dir / "eval"
