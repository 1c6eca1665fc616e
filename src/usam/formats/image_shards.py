"""The image shard format: labelled single-object training images, before SAM sees them.

An image set is a directory of WebDataset tar shards plus ``manifest.json``. Each
sample is ``<key>.jpg`` (RGB JPEG) and ``<key>.json`` (metadata); nothing is
pickled. Every ``.json`` holds ``class_name``, ``class_index``, ``source``
(``sd``, ``web`` or ``folder``) and ``sha256`` (of the JPEG bytes, checked on
read), plus what reproduces the image: ``prompt`` and ``seed`` for generated
images, ``url`` for downloaded ones, ``path`` for a local folder; ``member``
names the class actually shown when the label is a superclass, and ``flagged``
marks an image to leave out (a safety-checker black frame). Keys are
``c<class index>-<class>-<image index>`` for generated images and
``<source>-<sha256 prefix>`` otherwise. :func:`iter_images` is the reader.

Writing is atomic and resumable like the embedding shards (:mod:`usam.formats.embedding_shards`):
a shard is written under a temporary name and renamed when complete, and the
manifest is written last. Each sample is flushed to the operating system as it
is written, so when a process dies the complete samples of its open shard are
salvaged on the next open; a crash loses at most the image being written.
Re-opening a directory (finished or not) reports which samples it already
holds, so callers skip them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from usam.core.errors import UsageError
from usam.formats.storage import (
    atomic_write_text,
    check_key,
    listed_shards,
    read_manifest_payload,
    sequential_dataset,
)

# what Pillow reads as a photo
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SOURCES = ("sd", "web", "folder")
REQUIRED_META = ("class_name", "class_index", "source")
_SHARD_NAME = "images-{:06d}.tar"
_SHARD_GLOB = "images-*.tar"


class ImageShardError(UsageError, ValueError):
    """An image set that is missing, incomplete, corrupt or made for another class list."""


@dataclass
class ImageManifest:
    """What an image set holds and how it was made."""

    vocabulary: str
    classes: list[str]
    source: str
    random_weights: bool = False  # True when the images come from an untrained generator
    config: dict[str, Any] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    per_class: dict[str, int] = field(default_factory=dict)
    flagged: int = 0  # images marked unusable (e.g. blacked out by a safety checker)
    format_version: int = FORMAT_VERSION

    @property
    def num_images(self) -> int:
        return sum(s["images"] for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["counts"] = {"images": self.num_images, "shards": len(self.shards)}
        return payload


def slug(name: str) -> str:
    """A class name as it may appear in a sample key ('dining table' -> 'dining_table')."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF rotation applied, transparency flattened onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        if array.max(initial=0) > 255:  # 16-bit data: keep the range instead of clipping it
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    to_rgb(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_image_manifest(directory: str | Path) -> ImageManifest:
    payload = read_manifest_payload(
        directory,
        MANIFEST_NAME,
        FORMAT_VERSION,
        ImageShardError,
        "image set",
        "regenerate the image set",
    )
    return ImageManifest(**payload)


def shard_paths(directory: str | Path, manifest: ImageManifest | None = None) -> list[Path]:
    """The finished shards of an image set, in manifest order."""
    directory = Path(directory)
    manifest = manifest or read_image_manifest(directory)
    return listed_shards(directory, manifest.shards, MANIFEST_NAME, ImageShardError)


def images_on_disk(directory: str | Path) -> int:
    """Images in the finished shards of a set, with or without its manifest (a stopped run)."""
    return sum(1 for path in sorted(Path(directory).glob("*.tar")) for _ in index_shard(path))


def decode_sample(sample: dict[str, Any], origin: str = "") -> tuple[str, Image.Image, dict]:
    """(key, RGB image, metadata) from a raw WebDataset sample; fails on a hash mismatch."""
    key, meta = sample["__key__"], json.loads(sample["json"])
    return key, checked_image(key, sample["jpg"], meta, origin), meta


def checked_image(key: str, jpeg: bytes, meta: dict[str, Any], origin: str = "") -> Image.Image:
    """The RGB image of a stored JPEG; fails when it does not match its recorded sha256."""
    if sha256(jpeg) != meta["sha256"]:
        raise ImageShardError(
            f"image {key!r}{' in ' + origin if origin else ''} does not match its sha256; "
            "the shard is corrupt, delete it and run the job that wrote it again"
        )
    image = Image.open(io.BytesIO(jpeg))
    image.load()
    return image.convert("RGB")


def iter_images(
    directory: str | Path, *, include_flagged: bool = False
) -> Iterator[tuple[str, Image.Image, dict[str, Any]]]:
    """Every image of a finished image set as (key, PIL image, metadata), in shard order."""
    for path in shard_paths(directory):
        for sample in sequential_dataset([path]):
            key, image, meta = decode_sample(sample, str(path))
            if include_flagged or not meta.get("flagged"):
                yield key, image, meta


def index_shard(path: Path) -> Iterator[tuple[str, int, int, dict[str, Any]]]:
    """(key, JPEG offset, JPEG size, metadata) of every sample: random access to one JPEG."""
    jpegs: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                if extension == "jpg":
                    jpegs[key] = (member.offset_data, member.size)
                elif extension == "json" and key in jpegs:
                    meta = json.loads(tar.extractfile(member).read())
                    yield key, *jpegs.pop(key), meta
    except (tarfile.TarError, EOFError, ValueError) as error:
        raise ImageShardError(
            f"{path} is corrupt ({error}); delete it and run the job that wrote it again"
        ) from error


def _read_samples(path: Path, *, salvage: bool) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Complete samples of a shard; when salvaging, stop quietly where a crash cut it off."""
    pending: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise EOFError(f"{member.name} is cut short")
                if extension == "jpg":
                    pending[key] = data
                elif extension == "json" and key in pending:
                    meta = json.loads(data)
                    jpeg = pending.pop(key)
                    if meta.get("sha256") != sha256(jpeg):
                        raise ValueError(f"{key}.jpg does not match its sha256")
                    yield key, jpeg, meta
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        if not salvage:
            raise ImageShardError(
                f"{path} is corrupt ({error}); delete it and run the job that wrote it "
                "again to replace its images"
            ) from error


class ImageShardWriter:
    """Write samples into an image set; resumes an interrupted or finished one.

    ``done`` maps every key already in the directory to its metadata: callers skip
    those. Use as a context manager; on a clean exit the manifest is written, on an
    exception the open shard is still finished so no written image is lost.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        vocabulary: str,
        classes: Sequence[str],
        source: str,
        config: dict[str, Any] | None = None,
        random_weights: bool = False,
        images_per_shard: int = 1000,
    ) -> None:
        if source not in SOURCES:
            raise ImageShardError(f"image source {source!r} is not one of {', '.join(SOURCES)}")
        if images_per_shard < 1:
            raise ImageShardError(f"images_per_shard must be at least 1, got {images_per_shard}")
        self.directory = Path(directory)
        self.classes = list(classes)
        self.manifest = ImageManifest(
            vocabulary=vocabulary,
            classes=self.classes,
            source=source,
            random_weights=random_weights,
            config=dict(config or {}),
        )
        self.images_per_shard = images_per_shard
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_previous_manifest()
        self.done: dict[str, dict[str, Any]] = {}
        self._tar: tarfile.TarFile | None = None
        self._file: io.BufferedWriter | None = None
        self._open: dict[str, Any] = {}
        for path in sorted(self.directory.glob(_SHARD_GLOB)):
            keys = []
            for key, _, meta in _read_samples(path, salvage=False):
                self._accept(key, meta, str(path))
                keys.append(key)
            self.manifest.shards.append({"name": path.name, "images": len(keys)})
        self._salvage()

    def __enter__(self) -> ImageShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._finish_shard()
        if exc_type is None:
            self.finalize()

    def write(self, key: str, jpeg: bytes, meta: dict[str, Any]) -> dict[str, Any]:
        """Append one sample; ``sha256`` is computed here so it always matches the bytes."""
        check_key(key, ImageShardError)
        if key in self.done:
            raise ImageShardError(f"image {key!r} is already in {self.directory}")
        missing = [name for name in REQUIRED_META if name not in meta]
        if missing:
            raise ImageShardError(f"image {key!r}: metadata lacks {', '.join(missing)}")
        meta = {**meta, "sha256": sha256(jpeg)}
        self._check_label(key, meta, "the new sample")
        if self._tar is None:
            self._start_shard()
        payload = json.dumps(meta, sort_keys=True).encode()
        for name, data in ((f"{key}.jpg", jpeg), (f"{key}.json", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            self._tar.addfile(info, io.BytesIO(data))
        self._file.flush()
        self._accept(key, meta, "the new sample")
        self._open["images"] += 1
        if self._open["images"] >= self.images_per_shard:
            self._finish_shard()
        return meta

    def finalize(self) -> ImageManifest:
        self._finish_shard()
        per_class = Counter(m["class_name"] for m in self.done.values() if not m.get("flagged"))
        self.manifest.per_class = {name: per_class.get(name, 0) for name in self.classes}
        self.manifest.flagged = sum(1 for m in self.done.values() if m.get("flagged"))
        atomic_write_text(
            self.directory / MANIFEST_NAME, json.dumps(self.manifest.to_json(), indent=2)
        )
        return self.manifest

    def _check_previous_manifest(self) -> None:
        if not (self.directory / MANIFEST_NAME).is_file():
            return
        previous = read_image_manifest(self.directory)
        if previous.classes != self.classes or previous.source != self.manifest.source:
            raise ImageShardError(
                f"{self.directory} holds a finished '{previous.source}' image set for classes "
                f"{previous.classes}, not a '{self.manifest.source}' set for {self.classes}; "
                "write to another directory or delete this one"
            )

    def _check_label(self, key: str, meta: dict[str, Any], origin: str) -> None:
        index = meta["class_index"]
        if not (isinstance(index, int) and 0 <= index < len(self.classes)):
            raise ImageShardError(
                f"image {key!r} in {origin}: class index {index!r} is outside the "
                f"{len(self.classes)} classes of this image set"
            )
        if self.classes[index] != meta["class_name"]:
            raise ImageShardError(
                f"image {key!r} in {origin} is labelled '{meta['class_name']}' (class "
                f"{index}), but class {index} here is '{self.classes[index]}': the directory "
                "was written for another class list; write elsewhere or delete it"
            )

    def _accept(self, key: str, meta: dict[str, Any], origin: str) -> None:
        if key in self.done:
            raise ImageShardError(f"image {key!r} appears twice in {self.directory}")
        self._check_label(key, meta, origin)
        self.done[key] = meta

    def _salvage(self) -> None:
        """Keep the complete samples of shards a crashed writer left under temporary names."""
        for tmp in sorted(self.directory.glob("*.tmp")):
            is_shard = tmp.name.endswith(".tar.tmp")
            samples = list(_read_samples(tmp, salvage=True)) if is_shard else []
            tmp.unlink()
            for key, jpeg, meta in samples:
                if key not in self.done:
                    meta.pop("sha256")
                    self.write(key, jpeg, meta)

    def _start_shard(self) -> None:
        taken = {s["name"] for s in self.manifest.shards}
        name = next(n for i in range(len(taken) + 1) if (n := _SHARD_NAME.format(i)) not in taken)
        self._file = open(self.directory / (name + ".tmp"), "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._open = {"name": name, "images": 0}

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._open["name"]
        os.replace(self.directory / (name + ".tmp"), self.directory / name)
        self.manifest.shards.append(dict(self._open))
        self._tar = None
        self._file = None
