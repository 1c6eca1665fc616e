"""Near-duplicate detection by difference hash (dHash): the same photo resized,
re-encoded or lightly retouched hashes to within a few of 64 bits.

The hash is the sign of the horizontal brightness gradient on a 9 x 8 grayscale
thumbnail. :class:`HashIndex` answers "is anything stored within ``bits`` of
this hash?" by brute force over numpy (fast enough for tens of thousands of
images), and :class:`ExcludedImages` hashes images the user names, such as an
evaluation set that no training image may be a near-copy of, whatever the ingest.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from usam.formats.image_shards import IMAGE_SUFFIXES, to_rgb
from usam.images.fetching import FetchError
from usam.images.ingest_settings import IngestError

log = logging.getLogger(__name__)

_WIDTH, _HEIGHT = 9, 8


def dhash(image: Image.Image) -> int:
    """64-bit difference hash of an image (any mode, any size)."""
    image.draft("L", (_WIDTH * 8, _HEIGHT * 8))  # JPEG: decode at a fraction of the size
    gray = to_rgb(image).convert("L").resize((_WIDTH, _HEIGHT), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def dhash_bytes(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        return dhash(image)


class HashIndex:
    """Hashes with a label each (a key, a file name); finds the nearest within ``bits``."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._hashes = np.zeros(0, dtype=np.uint64)
        self._labels: list[str] = []

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, value: int, label: str) -> None:
        self._hashes = np.append(self._hashes, np.uint64(value))
        self._labels.append(label)

    def match(self, value: int) -> tuple[str, int] | None:
        """(label, Hamming distance) of the closest stored hash within ``bits``, or None."""
        if not self._labels:
            return None
        distances = np.bitwise_count(self._hashes ^ np.uint64(value))
        best = int(np.argmin(distances))
        if distances[best] > self.bits:
            return None
        return self._labels[best], int(distances[best])


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """The image files named: files as given, folders searched recursively."""
    files = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            raise IngestError(
                f"{path} (in ingest.exclude_images) does not exist; name image folders or files"
            )
    return files


def hash_files(paths: Iterable[str | Path], bits: int) -> HashIndex:
    """An index of every readable image named (unreadable ones are logged and skipped)."""
    index = HashIndex(bits)
    files = image_files(paths)
    if files:
        log.info("hashing %d images to keep out of the training set", len(files))
    for file in files:
        try:
            with Image.open(file) as image:
                index.add(dhash(image), str(file))
        except (OSError, UnidentifiedImageError) as error:
            log.warning("cannot hash %s (%s); it is not excluded", file, error)
    return index


class ExcludedImages:
    """The images ``ingest.exclude_images`` names (an evaluation set), which every ingest
    holds each image against: the paper's setting has no test images in training."""

    def __init__(self, paths: Iterable[str | Path], bits: int) -> None:
        self.index = hash_files(paths, bits)

    def check(self, value: int) -> None:
        """Refuses an image (by its dHash) within ``bits`` of an excluded one."""
        if hit := self.index.match(value):
            raise FetchError("evaluation_image", f"{hit[1]} of 64 bits from {hit[0]}")
