"""The embedding shard set of an evaluation dataset, shared by ``usam.eval`` and ``usam.fit``,
the part of it one DDP rank scores, and the check that a set made to be classified holds
masks at all (eval, annotate).

It is extracted on demand and cached under ``<data_dir>/shards`` by the id of its
images, SAM and mask settings, so every later evaluation with the same SAM reuses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from usam.data.extraction import ExtractSettings, run_extraction, shard_set_dir
from usam.data.rank_shares import RankShare
from usam.data.sources import ImageSource
from usam.formats import storage
from usam.formats.embedding_shards import (
    ImageRecord,
    Manifest,
    ShardSetError,
    decode_sample,
    read_manifest,
    shard_urls,
)
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings


def eval_shards(
    name: str,
    source: ImageSource,
    data_dir: Path,
    sam: SamSettings,
    amg: AmgSettings,
    extract: ExtractSettings,
    *,
    shards_dir: str | Path | None = None,
    config: dict[str, Any] | None = None,
) -> storage.Location:
    """The ``eval`` folder of dataset ``name``'s shard set, extracted first when missing:
    under ``shards_dir`` when given, else cached under ``data_dir/shards``. ``config`` is
    recorded in its manifest. ``shards_dir`` may be a URL (``s3://``, ``gs://``, ``https://``)."""
    out_dir = (
        storage.location(shards_dir)
        if shards_dir
        else shard_set_dir(data_dir / "shards", f"eval-{name}", source, sam, amg, 0.0)
    )
    manifests = run_extraction(source, out_dir, sam, amg, extract, config=config)
    require_masks(manifests["eval"], storage.join(out_dir, "eval"), amg)
    return storage.join(out_dir, "eval")


def rank_records(directory: str | Path, share: RankShare) -> Iterator[ImageRecord]:
    """The images of the shard set in ``directory`` that rank ``share.rank`` scores, in this
    process: the part the DataModule's loaders give that rank, so the ranks' parts are
    disjoint and together the set, however few its shards."""
    urls = shard_urls(directory, read_manifest(directory))
    yield from wds.DataPipeline(share.samples(urls), wds.map(decode_sample))


def require_masks(manifest: Manifest, where: storage.Location, settings: AmgSettings) -> None:
    """Images in which SAM kept no mask at all leave nothing to classify: say so, and how."""
    if manifest.num_images and not manifest.num_masks:
        raise ShardSetError(
            f"SAM kept no mask in any of the {manifest.num_images} images of {where} with "
            f"amg.pred_iou_thresh={settings.pred_iou_thresh} and "
            f"amg.stability_score_thresh={settings.stability_score_thresh} "
            f"(points_per_side={settings.points_per_side}): lower those thresholds, or use "
            "the mask settings the head was trained with"
        )
