"""Class names -> training images -> SAM embedding shards, each step cached, for ``fit``.

A run names its vocabulary, its image source (``sd`` generates with Stable
Diffusion, any other name reads a set stored before, such as ``usam.ingest``'s ``web``:
:mod:`usam.images.image_sets`) and its SAM; the shard set directory is derived from a
hash of the images and the settings, so a changed input or setting gets its own set and
an unchanged one is reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from usam.core.vocabulary import Vocabulary
from usam.data.extraction import (
    ExtractSettings,
    is_complete,
    run_extraction,
    shard_set_dir,
    splits_for,
)
from usam.data.sources import ImageShardSource
from usam.images.image_sets import GENERATED, image_set_dir, require_image_set
from usam.images.stable_diffusion import GenerateSettings, generate_images
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings


@dataclass
class TrainingPipeline:
    vocabulary: Vocabulary
    source: str  # sd (generated when missing) | web | any image set name
    images_root: Path
    shards_root: Path
    sam: SamSettings
    amg: AmgSettings
    generate: GenerateSettings  # used when source is sd
    extract: ExtractSettings

    def _set_source(self) -> str:
        """The image set's name after the vocabulary: the generator's own for source sd."""
        return self.generate.name if self.source == GENERATED else self.source

    def image_dir(self) -> Path:
        return image_set_dir(self.images_root, self.vocabulary, self._set_source())

    def _image_source(self) -> ImageShardSource:
        return ImageShardSource(
            require_image_set(self.images_root, self.vocabulary, self._set_source())
        )

    def _shard_dir(self, source: ImageShardSource) -> Path:
        return shard_set_dir(
            self.shards_root,
            self.image_dir().name,
            source,
            self.sam,
            self.amg,
            self.extract.val_fraction,
        )

    def locate(self) -> Path:
        """The shard set directory (its ``train``/``val`` splits), without making anything."""
        return self._shard_dir(self._image_source())

    def _needs_images(self) -> bool:
        return self.source == GENERATED and not (self.image_dir() / "manifest.json").is_file()

    def check_weights(self) -> None:
        """Before any long step, the SAM that extraction will need is on disk (downloaded now
        when online), so hours of image generation never end in a missing checkpoint."""
        if not self._needs_images():
            source = self._image_source()
            splits = splits_for(source, self.extract.val_fraction)
            if is_complete(self._shard_dir(source), splits):
                return
        self.sam.ensure_weights()

    def prepare(self) -> Path:
        """Generate missing images (source sd), extract missing shards; return the set."""
        self.check_weights()
        if self._needs_images():
            generate_images(self.vocabulary, self.generate, self.image_dir())
        source = self._image_source()
        out_dir = self._shard_dir(source)
        run_extraction(source, out_dir, self.sam, self.amg, self.extract)
        return out_dir
