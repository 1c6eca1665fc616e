"""The one naming of training image sets: ``<images_dir>/<vocabulary>_<source>``.

``<vocabulary>`` is the vocabulary's name (an inline class list: ``custom-<hash of its
names>``). ``<source>`` says where the images come from, and it is what ``data.source``
takes to select the set, in ``usam.extract`` and ``usam.fit`` alike:

- ``sd``: Stable Diffusion (``usam.generate``, whose ``generate.name`` it is);
  ``sd_tiny``: the tiny random pipeline of ``generate=tiny``, whose images are noise, kept
  apart so that they never mix with real ones;
- ``web``: photos stored by ``usam.ingest``, whether from a URL list, an image search or a
  folder of your own: the paper's web-crawled images, which ``experiment=voc_wc`` reads;
- any other ``generate.name`` or ``ingest.name``, to keep a set apart.

Generation, ingest, extraction and training all name sets through :func:`image_set_dir`,
and a set that is missing is reported with the sets that do exist and the settings that
select each (:func:`require_image_set`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

from usam.core.vocabulary import PACKAGED, Vocabulary
from usam.formats.image_shards import (
    MANIFEST_NAME,
    ImageShardError,
    read_image_manifest,
    slug,
)

GENERATED = "sd"  # Stable Diffusion; generated sets' names start with it (sd_tiny, sd_members)
PHOTOS = "web"  # every ingest: URL lists, image searches and folders
_INLINE = "custom"  # the name load_vocabulary gives an inline class list


class MissingImageSetError(ImageShardError):
    """No finished image set where the run's vocabulary and ``data.source`` point."""


class ImageSet(NamedTuple):
    """A finished image set found on disk, and what selects it."""

    directory: Path
    vocabulary: Vocabulary
    source: str
    random_weights: bool


def vocabulary_tag(vocab: Vocabulary) -> str:
    """Directory-safe vocabulary name; inline lists are told apart by a hash of their names."""
    if vocab.name == _INLINE:
        return f"{_INLINE}-" + hashlib.sha256("\n".join(vocab.classes).encode()).hexdigest()[:8]
    return slug(vocab.name)


def image_set_name(vocab: Vocabulary, source: str) -> str:
    """``<vocabulary>_<source>``: an image set's folder, and the name of shards made from it."""
    return f"{vocabulary_tag(vocab)}_{source}"


def image_set_dir(images_dir: str | Path, vocab: Vocabulary, source: str) -> Path:
    """Where a vocabulary's ``source`` set lives: ``<images_dir>/<vocabulary>_<source>``."""
    return Path(images_dir) / image_set_name(vocab, source)


def existing_image_sets(images_dir: str | Path) -> list[ImageSet]:
    """The finished sets under ``images_dir`` that this naming can select, sorted by name."""
    found = []
    for directory in sorted(p.parent for p in Path(images_dir).glob(f"*/{MANIFEST_NAME}")):
        try:
            manifest = read_image_manifest(directory)
        except (ValueError, TypeError):  # ImageShardError is a ValueError too
            continue  # not a readable image set: nothing to select
        vocab = Vocabulary(manifest.vocabulary, tuple(manifest.classes))
        prefix = f"{vocabulary_tag(vocab)}_"
        if directory.name.startswith(prefix):
            source = directory.name[len(prefix) :]
            found.append(ImageSet(directory, vocab, source, manifest.random_weights))
    return found


def selecting(image_set: ImageSet, vocab: Vocabulary) -> str:
    """The settings that select ``image_set`` in a run whose vocabulary is ``vocab``."""
    setting = f"data.source={image_set.source}"
    other = image_set.vocabulary
    if other.classes == vocab.classes:
        return setting
    if other.name in PACKAGED:
        classes = other.name
    elif other.name == _INLINE:
        classes = f"[{','.join(other.classes)}]"
    else:
        classes = f"<the JSON file of vocabulary '{other.name}'>"
    return f"data.classes={classes} {setting}"


def how_to_make(vocab: Vocabulary, source: str) -> str:
    """The command that writes the ``source`` set of a vocabulary."""
    classes = f"data.classes={vocab.name if vocab.name in PACKAGED else '...'}"
    if source == GENERATED:
        return f"`python -m usam.generate {classes}`"
    if source == f"{GENERATED}_tiny":
        return f"`python -m usam.generate {classes} generate=tiny`"
    if source == PHOTOS:
        return (
            f"`python -m usam.ingest {classes} ingest.urls=FILE` (or ingest=folder "
            "ingest.root=DIR, ingest=openverse, ingest=wikimedia)"
        )
    return (
        f"`python -m usam.generate {classes} generate.name={source}` or "
        f"`python -m usam.ingest {classes} ingest.name={source} ...`"
    )


def require_image_set(images_dir: str | Path, vocab: Vocabulary, source: str) -> Path:
    """The finished ``source`` set of ``vocab``, or an error listing the sets there are."""
    directory = image_set_dir(images_dir, vocab, source)
    if (directory / MANIFEST_NAME).is_file():
        return directory
    sets = existing_image_sets(images_dir)
    listed = [
        f"{s.directory.name} ({selecting(s, vocab)}{', random weights' * s.random_weights})"
        for s in sets
    ]
    there = "it holds no image set yet; make this one"
    if sets:
        there = f"image sets there: {'; '.join(listed)}. Select one of those, or make this one"
    raise MissingImageSetError(
        f"data.source={source}: no finished image set {directory.name} in {Path(images_dir)}; "
        f"{there} with {how_to_make(vocab, source)}"
    )
