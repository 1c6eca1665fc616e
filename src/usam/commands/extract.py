"""Extract SAM embedding shards: ``python -m usam.extract source=image_set data=voc sam=vit_b``.

Writes ``<out_dir>/train`` and ``<out_dir>/val`` (or ``eval`` for an evaluation
source) through :mod:`usam.data.extraction`; prints per split what it holds. ``out_dir``
may be a URL of object storage (``s3://bucket/set``, see docs/shards.md).
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from usam.core.config import settings_from_config
from usam.core.stopping import stoppable
from usam.data.extraction import ExtractSettings, run_extraction, shard_set_dir
from usam.data.sources import ImageSource
from usam.formats import storage
from usam.formats.embedding_shards import Manifest, existing_keys
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings


def run(cfg: DictConfig) -> None:
    """Extract ``cfg.source`` and print what each split holds."""
    source: ImageSource = instantiate(cfg.source)
    sam = settings_from_config(SamSettings, cfg.sam, "sam")
    amg = settings_from_config(AmgSettings, cfg.amg, "amg")
    extract = settings_from_config(ExtractSettings, cfg.extract, "extract")
    out_dir = (
        storage.location(cfg.out_dir)
        if cfg.out_dir
        else shard_set_dir(
            Path(cfg.paths.data_dir) / "shards",
            source.name,
            source,
            sam,
            amg,
            extract.val_fraction,
        )
    )
    with stoppable("extract", lambda: _progress_note(source, out_dir)):
        manifests = run_extraction(
            source, out_dir, sam, amg, extract, config=OmegaConf.to_container(cfg, resolve=True)
        )
    _print_splits(manifests, out_dir)


@rank_zero_only
def _print_splits(manifests: dict[str, Manifest], out_dir: storage.Location) -> None:
    """What each split holds, once: under DDP every rank returns the same manifests."""
    for split, manifest in manifests.items():
        megabytes = storage.total_bytes(storage.join(out_dir, split), "*.tar") / 1e6
        print(
            f"{split}: {manifest.num_images} images, {manifest.num_masks} masks "
            f"({manifest.num_masks / max(manifest.num_images, 1):.1f} per image), "
            f"{len(manifest.shards)} shards, {megabytes:.1f} MB in "
            f"{storage.join(out_dir, split)}{manifest.provenance.note()}"
        )


def _progress_note(source: ImageSource, out_dir: storage.Location) -> str:
    splits = (storage.join(out_dir, split) for split in ("train", "val", "eval"))
    done = set().union(*map(existing_keys, splits))
    return f"{len(done)} of {len(source)} images extracted into {out_dir}"
