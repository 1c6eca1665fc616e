"""Entry point for training images from the web or disk (see :mod:`usam.images.web_crawl`
and :mod:`usam.images.image_search`).

    python -m usam.ingest data.classes=voc20 ingest.urls=urls.csv
    python -m usam.ingest data.classes=voc20 ingest=folder ingest.root=my_photos
    python -m usam.ingest data.classes=voc20 ingest=openverse ingest.per_class=200
    python -m usam.ingest data.classes=voc20 ingest=wikimedia ingest.per_class=200

Images go to ``${paths.data_dir}/images/<vocabulary>_<ingest.name>/``: ``voc20_web`` for
every kind of ingest (URL lists, folders and both image searches fill one set of photos,
de-duplicated across them), which ``data.source=web`` and ``experiment=voc_wc`` read
(:mod:`usam.images.image_sets`); ``ingest.name`` keeps a set apart and ``ingest.out_dir``
puts it anywhere. Beside the generated sets of :mod:`usam.generate`, with
``failed.jsonl``, ``contact_sheets/`` and, for image searches, ``ATTRIBUTION.csv`` inside.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from usam.core.stopping import stoppable
from usam.core.vocabulary import load_vocabulary
from usam.formats.image_shards import images_on_disk
from usam.images.image_search import ingest_search
from usam.images.image_sets import image_set_dir
from usam.images.ingest_settings import SEARCH_KINDS, IngestSettings
from usam.images.web_crawl import ingest_folder, ingest_urls


def run(cfg: DictConfig) -> Path:
    """Ingest from a composed config (``ingest.yaml``); returns the image set directory."""
    vocab = load_vocabulary(cfg.data.classes)
    settings = IngestSettings.from_config(OmegaConf.to_container(cfg.ingest, resolve=True))
    out_dir = Path(settings.out_dir or image_set_dir(cfg.images_dir, vocab, settings.name))
    with stoppable("ingest", lambda: f"{images_on_disk(out_dir)} images in {out_dir}"):
        if settings.kind == "web":
            ingest_urls(settings.urls, vocab, out_dir, settings)
        elif settings.kind in SEARCH_KINDS:
            ingest_search(vocab, out_dir, settings)
        else:
            ingest_folder(settings.root, vocab, out_dir, settings)
    return out_dir
