"""Image sources: the one interface the SAM extraction engine reads images through.

A source is an indexed list of images known up front (``keys``), each loaded on
demand by ``load(index)``, so an engine can skip images it already extracted and
split the rest across processes without decoding anything. ``load`` raises
:class:`RejectedImage` for a file that is not a usable image (corrupt,
truncated, empty, not an image); iterating a source skips those and records
them in ``rejected`` as ``(path, reason)`` for the caller's ``rejected.jsonl``.

``fingerprint()`` hashes what defines the images a source yields (class list,
keys, file names with size and modification time, or content hashes where the
format stores them) so that a shard set made from it can be cached and reused.

Training sources (``kind == "train"``) give image-level multi-hot ``labels``;
evaluation sources (``kind == "eval"``) give a JSON-able ``ground_truth``
reference that :func:`usam.data.eval_datasets.load_ground_truth` turns into masks, or
none for plain folders to annotate. Evaluation datasets live in
:mod:`usam.data.ground_truth`.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image

from usam.core.config import ConfigError
from usam.core.errors import InputFileError
from usam.core.vocabulary import load_vocabulary
from usam.formats.image_shards import (
    checked_image,
    index_shard,
    read_image_manifest,
    shard_paths,
    to_rgb,
)
from usam.formats.storage import KEY_PATTERN
from usam.images.image_sets import image_set_name, require_image_set

KINDS = ("train", "eval")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")
_MAX_READABLE = 80  # characters of the readable part of a derived key
# What Pillow raises on files that are not decodable images.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class RejectedImage(Exception):
    """A file that cannot be used as an image; the engine skips it into ``rejected.jsonl``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class SourceImage:
    """One image as the extraction engine receives it (``image`` is always 8-bit RGB)."""

    key: str
    image: Image.Image
    labels: list[int] | None = None  # multi-hot over the source's classes (training images)
    ground_truth: dict[str, Any] | None = None  # reference for load_ground_truth (evaluation)
    source: dict[str, Any] = field(default_factory=dict)  # where the image came from


def image_key(name: str) -> str:
    """A shard key for a name: the name itself when it is already a valid key.

    Otherwise its readable form (runs of characters outside [A-Za-z0-9_-], dots
    included, become '_') plus a hash of the exact name, so two names that read
    alike ('a.b.jpg', 'a_b.jpg') still get different keys, and the same name
    always gets the same key whatever else is in the directory. A file name that is
    not valid UTF-8 reaches Python with its bytes as surrogates; they are hashed as
    those bytes.
    """
    if KEY_PATTERN.match(name):
        return name
    readable = _UNSAFE.sub("_", name).strip("_")[:_MAX_READABLE] or "image"
    exact = name.encode("utf-8", "surrogateescape")
    return f"{readable}-{hashlib.sha256(exact).hexdigest()[:10]}"


def load_rgb(path: str | Path, *, upright: bool = True) -> Image.Image:
    """Decode a file into 8-bit RGB, or raise :class:`RejectedImage` saying why not.

    ``upright`` applies the EXIF orientation. Annotated datasets pass False: their
    masks were drawn on the stored pixel grid, so rotating the photo would
    misalign it with its ground truth.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise RejectedImage(path, "empty file (0 bytes)")
        with Image.open(path) as image:
            image.load()
            if not upright:
                image.getexif().pop(ExifTags.Base.Orientation, None)
            return to_rgb(image)
    except (FileNotFoundError, PermissionError) as error:
        raise RejectedImage(path, f"cannot read the file: {error.strerror}") from error
    except Image.DecompressionBombError as error:
        raise RejectedImage(path, f"too large to decode safely: {error}") from error
    except Image.UnidentifiedImageError as error:
        raise RejectedImage(path, "not an image Pillow can read") from error
    except _DECODE_ERRORS as error:
        raise RejectedImage(path, f"corrupt or truncated image: {error}") from error


def check_unique_keys(keys: Sequence[str], names: Sequence[str], where: str | Path) -> None:
    """Fail when two inputs would share a shard key (one would overwrite the other)."""
    seen: dict[str, str] = {}
    for key, name in zip(keys, names):
        if key in seen:
            raise ConfigError(
                f"{where}: '{seen[key]}' and '{name}' both map to sample key {key!r}; "
                "rename one of them"
            )
        seen[key] = name


def file_stamp(path: Path, root: Path) -> list[Any]:
    """(relative path, size, mtime) of a file: enough to notice it changed, without reading it."""
    stat = path.stat()
    return [path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns]


class ImageSource(ABC):
    """Images for one extraction run: ``keys`` up front, pixels on ``load``.

    Subclasses set ``classes``, ``kind`` and ``keys`` and implement ``load`` and
    ``_inputs`` (the JSON-able description of their inputs that the fingerprint hashes).
    """

    classes: tuple[str, ...]
    kind: str
    keys: tuple[str, ...]
    name = "images"  # what a shard set made from it is named after
    random_weights = False  # the images come from an untrained generator

    def __init__(self, classes: Sequence[str], kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"source kind {kind!r} is not one of {', '.join(KINDS)}")
        self.classes = tuple(classes)
        self.kind = kind
        self.keys = ()
        self.listing_rejected: list[tuple[str, str]] = []  # found while listing inputs
        self.rejected: list[tuple[str, str]] = []

    @abstractmethod
    def load(self, index: int) -> SourceImage:
        """The image at ``index``; raises :class:`RejectedImage` for an unusable file."""

    @abstractmethod
    def _inputs(self) -> Any:
        """JSON-able description of everything that defines this source's images."""

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[SourceImage]:
        """Every usable image in order; ``rejected`` lists the rest after the pass."""
        self.rejected = list(self.listing_rejected)
        for index in range(len(self.keys)):
            try:
                yield self.load(index)
            except RejectedImage as error:
                self.rejected.append((error.path, error.reason))

    def fingerprint(self) -> str:
        payload = {
            "type": type(self).__name__,
            "kind": self.kind,
            "classes": list(self.classes),
            "inputs": self._inputs(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _visible_files(root: Path) -> list[Path]:
    """Files under ``root``, sorted, skipping hidden files and folders ('.DS_Store', '.git')."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(Path(directory) / f for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


_GLOB_CHARACTERS = frozenset("*?[")


def _selected_files(images: str | Path) -> tuple[Path, list[Path]]:
    """(root, files) for one image, a folder (recursively) or a glob pattern (``**`` too)."""
    text = str(images)
    if _GLOB_CHARACTERS & set(text):
        parts = Path(text).parts
        fixed = next(i for i, part in enumerate(parts) if _GLOB_CHARACTERS & set(part))
        root = Path(*parts[:fixed]).resolve() if fixed else Path.cwd()
        matches = (Path(m).resolve() for m in glob.glob(text, recursive=True))
        files = [m for m in matches if m.is_file() and not m.name.startswith(".")]
        if not files:
            raise InputFileError(f"the pattern images={images} matches no file")
        return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())
    path = Path(images).resolve()
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise InputFileError(
            f"images={images} is not an image file, a folder or a glob pattern ('photos/*.jpg')"
        )
    files = _visible_files(path)
    if not files:
        raise InputFileError(f"the image folder {images} holds no files")
    return path, files


class FolderSource(ImageSource):
    """One image, every file under a folder (recursively), or the files a glob pattern
    matches, for annotation (no ground truth).

    Every visible file is a candidate, so stray non-images show up in ``rejected``
    instead of vanishing silently. Keys derive from the path relative to ``root`` (the
    folder, the file's folder, or the pattern's fixed leading folders).
    """

    def __init__(
        self, root: str | Path, classes: str | Sequence[str], max_side: int | None = None
    ) -> None:
        """``root``: one image, a folder or a glob pattern (``source.root``, annotate's
        ``images``). ``max_side``: images whose longer side exceeds it are scaled down to it
        before SAM sees them (``source["original_size"]`` keeps the file's size); None keeps
        every pixel."""
        vocabulary = load_vocabulary(classes)
        super().__init__(vocabulary.classes, "eval")
        self.name = image_set_name(vocabulary, "folder")
        if max_side is not None and max_side < 64:
            raise ConfigError(f"max_side={max_side}: give at least 64 pixels, or null")
        self.max_side = max_side
        self.root, self.paths = _selected_files(root)
        names = [p.relative_to(self.root).as_posix() for p in self.paths]
        self.keys = tuple(image_key(n) for n in names)
        check_unique_keys(self.keys, names, self.root)

    def load(self, index: int) -> SourceImage:
        path = self.paths[index]
        image = load_rgb(path)
        source = {
            "type": "folder",
            "root": str(self.root),
            "path": path.relative_to(self.root).as_posix(),
        }
        if self.max_side is not None and max(image.size) > self.max_side:
            source["original_size"] = [image.height, image.width]
            scale = self.max_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
        return SourceImage(key=self.keys[index], image=image, source=source)

    def subset(self, keep: Callable[[str, Path], bool]) -> FolderSource:
        """A copy holding the files ``keep(key, path)`` accepts, so extraction sees (and its
        cache is named by) those alone."""
        kept = [(key, path) for key, path in zip(self.keys, self.paths) if keep(key, path)]
        subset = copy.copy(self)
        subset.keys = tuple(key for key, _ in kept)
        subset.paths = [path for _, path in kept]
        return subset

    def _inputs(self) -> Any:
        files = [file_stamp(p, self.root) for p in self.paths]
        scaled = {"max_side": self.max_side} if self.max_side is not None else {}
        return {"root": str(self.root), "files": files, **scaled}


class ImageShardSource(ImageSource):
    """A training image set written by :mod:`usam.formats.image_shards`, with one-hot labels.

    Listing reads only the tar headers and the small metadata entries, and notes
    where each JPEG sits, so ``load`` reads one image without scanning the shard.
    Flagged images (e.g. safety-checker black frames) are left out.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).resolve()
        manifest = read_image_manifest(self.directory)
        super().__init__(manifest.classes, "train")
        self.name = self.directory.name
        self.random_weights = manifest.random_weights
        self._entries: list[tuple[Path, int, int, dict[str, Any]]] = []
        keys = []
        for path in shard_paths(self.directory, manifest):
            for key, offset, size, meta in index_shard(path):
                if not meta.get("flagged"):
                    keys.append(key)
                    self._entries.append((path, offset, size, meta))
        self.keys = tuple(keys)

    def load(self, index: int) -> SourceImage:
        path, offset, size, meta = self._entries[index]
        with open(path, "rb") as handle:
            handle.seek(offset)
            jpeg = handle.read(size)
        key = self.keys[index]
        image = checked_image(key, jpeg, meta, str(path))
        labels = [0] * len(self.classes)
        labels[meta["class_index"]] = 1
        source = {"type": "image_shards", "shard": path.name, **meta}
        return SourceImage(key=key, image=image, labels=labels, source=source)

    def _inputs(self) -> Any:
        return [[key, entry[3]["sha256"]] for key, entry in zip(self.keys, self._entries)]


def image_set_source(
    images_dir: str | Path, classes: str | Sequence[str], source: str
) -> ImageShardSource:
    """The image set ``data.classes`` and ``data.source`` name (``source=image_set``), or an
    error listing the sets ``images_dir`` holds and what selects each."""
    return ImageShardSource(require_image_set(images_dir, load_vocabulary(classes), source))
