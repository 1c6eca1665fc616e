"""The embedding shard format: the contract between extraction, training and evaluation.

A shard set is a directory of WebDataset tar shards plus ``manifest.json``. Each
sample is one image; every per-mask array shares its first axis N. Only ``.npy``
(loaded with ``allow_pickle=False``) and ``.json`` entries are written, so reading
a shard never unpickles. ``docs/shards.md`` is the human-readable version.

Writing is atomic and resumable: a shard is written under a temporary name and renamed
(uploaded, for a set at a URL) when complete, and the manifest is written last. Re-opening
a set without a manifest keeps its complete shards and reports which images they hold.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from pycocotools import mask as mask_utils

from usam.core.errors import UsageError
from usam.core.provenance import Provenance, untrained
from usam.formats import storage
from usam.formats.storage import (
    KEY_PATTERN,
    Location,
    atomic_write_text,
    check_key,
    listed_shards,
    read_manifest_payload,
    sequential_dataset,
)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS_PER_POINT = 4
TOKEN_DIM = 256
DEFAULT_EMBED_DIM = TOKENS_PER_POINT * TOKEN_DIM
_SHARD_PREFIX = "shard-"

# name -> (dtype, trailing shape); the leading axis is the mask count N.
MASK_ARRAYS: dict[str, tuple[str, tuple[int, ...]]] = {
    "embeddings": ("float16", ()),  # (N, D): trailing dim checked against the manifest
    "iou_preds": ("float32", ()),
    "stability": ("float32", ()),
    "boxes": ("float32", (4,)),  # XYWH in image pixels, as SAM's generator reports them
    "points": ("float32", (2,)),  # (x, y) of the point prompt in image pixels
    "multimask": ("int8", ()),  # which of the 3 multimask outputs (0..2); token index is +1
}


class ShardSetError(UsageError, ValueError):
    """A shard set that is missing, incomplete, malformed or made for another run."""


@dataclass
class ImageRecord:
    """Everything stored for one image: its masks, their embeddings, and its labels."""

    key: str
    height: int
    width: int
    embeddings: np.ndarray
    iou_preds: np.ndarray
    stability: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    multimask: np.ndarray
    rles: list[str]
    labels: list[int] | None = None  # multi-hot over the manifest's classes (training images)
    ground_truth: dict[str, Any] | None = None  # reference to the annotation (evaluation images)
    source: dict[str, Any] = field(default_factory=dict)  # where the image came from

    @property
    def num_masks(self) -> int:
        return int(self.embeddings.shape[0])

    def coco_rles(self) -> list[dict[str, Any]]:
        """Masks as pycocotools RLE dicts (``size`` is stored once per image)."""
        return [{"size": [self.height, self.width], "counts": c} for c in self.rles]

    def masks(self) -> np.ndarray:
        """(N, H, W) bool."""
        return decode_masks(self.coco_rles(), self.height, self.width)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """The pycocotools RLE of one (H, W) mask, ``counts`` as a str: the form records hold."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def decode_masks(rles: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """(K, H, W) bool masks of pycocotools RLE dicts of one image."""
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    return mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)


@dataclass
class Manifest:
    """What a shard set holds and how it was made."""

    classes: list[str]
    embed_dim: int
    kind: str  # "train" (image-level labels) or "eval" (ground-truth references)
    sam: dict[str, Any]  # model_type, checkpoint_sha256, random_weights
    synthetic: bool = False  # True when embeddings were not produced by SAM at all
    images_random_weights: bool = False  # True when the images came from an untrained generator
    config: dict[str, Any] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    # the seed of the random order the images were written in (see ``mixed_order``); None:
    # the order the source listed them in (sets written before usam mixed them, eval sets)
    shuffle_seed: int | None = None

    @property
    def num_images(self) -> int:
        return sum(s["images"] for s in self.shards)

    @property
    def num_masks(self) -> int:
        return sum(s["masks"] for s in self.shards)

    @property
    def precision(self) -> str:  # amg.precision: fp32 for sets made before bf16 or without SAM
        return (self.config.get("amg") or {}).get("precision", "fp32")

    @property
    def provenance(self) -> Provenance:
        """Why the numbers this set leads to are not results, from its flags."""
        reasons = []
        if self.synthetic:
            reasons.append("synthetic embeddings (no SAM)")
        if self.images_random_weights:
            reasons.append("images from an untrained image generator")
        if self.sam.get("random_weights", False):
            reasons.append(untrained(f"SAM ({self.sam.get('model_type')})"))
        return Provenance.of(reasons)

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["counts"] = {
            "images": self.num_images,
            "masks": self.num_masks,
            "shards": len(self.shards),
        }
        return payload


def mixed_order(count: int, seed: int) -> list[int]:
    """The order a training set's images are written in: a seeded random permutation, so
    that every shard mixes the classes that image sources list one after another."""
    return np.random.default_rng(seed).permutation(count).tolist()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_record(record: ImageRecord, embed_dim: int) -> dict[str, Any]:
    """Validate a record and turn it into a WebDataset sample of .npy/.json entries."""
    sample: dict[str, Any] = {"__key__": check_key(record.key, ShardSetError)}
    count = record.num_masks
    for name, (dtype, trailing) in MASK_ARRAYS.items():
        array = np.asarray(getattr(record, name))
        expected = (count, embed_dim) if name == "embeddings" else (count, *trailing)
        if array.shape != expected:
            raise ShardSetError(
                f"image {record.key!r}: '{name}' has shape {array.shape}, expected {expected}"
            )
        sample[f"{name}.npy"] = _npy_bytes(array.astype(dtype, copy=False))
    if len(record.rles) != count:
        raise ShardSetError(f"image {record.key!r}: {len(record.rles)} RLEs for {count} masks")
    meta = {
        "height": int(record.height),
        "width": int(record.width),
        "rles": list(record.rles),
        "labels": record.labels,
        "ground_truth": record.ground_truth,
        "source": record.source,
    }
    sample["meta.json"] = json.dumps(meta).encode()
    return sample


def decode_sample(sample: dict[str, Any]) -> ImageRecord:
    """Inverse of :func:`encode_record` for a raw (undecoded) WebDataset sample."""
    meta = json.loads(sample["meta.json"])
    arrays = {name: _load_npy(sample[f"{name}.npy"]) for name in MASK_ARRAYS}
    return ImageRecord(
        key=sample["__key__"],
        height=meta["height"],
        width=meta["width"],
        rles=meta["rles"],
        labels=meta["labels"],
        ground_truth=meta["ground_truth"],
        source=meta["source"],
        **arrays,
    )


def read_manifest(directory: str | Path) -> Manifest:
    payload = read_manifest_payload(
        directory,
        MANIFEST_NAME,
        FORMAT_VERSION,
        ShardSetError,
        "shard set",
        "re-extract the shard set",
    )
    return Manifest(**payload)


def check_manifest(
    manifest: Manifest,
    directory: str | Path,
    *,
    classes: Sequence[str] | None = None,
    embed_dim: int | None = None,
    sam_model_type: str | None = None,
    precision: str | None = None,
) -> None:
    """Fail, naming every disagreement, when a shard set was made for another run."""
    problems = []
    if classes is not None and list(classes) != list(manifest.classes):
        ours, theirs = list(classes), list(manifest.classes)
        only_ours = [c for c in ours if c not in theirs]
        only_theirs = [c for c in theirs if c not in ours]
        detail = (
            f"only in the run: {only_ours}; only in the shards: {only_theirs}"
            if only_ours or only_theirs
            else "same names in another order"
        )
        problems.append(
            f"class list differs ({len(ours)} classes in the run, {len(theirs)} in the shards; "
            f"{detail})"
        )
    if embed_dim is not None and embed_dim != manifest.embed_dim:
        problems.append(f"embedding dim differs (run: {embed_dim}, shards: {manifest.embed_dim})")
    if sam_model_type is not None and sam_model_type != manifest.sam.get("model_type"):
        problems.append(
            f"SAM model type differs (run: {sam_model_type}, "
            f"shards: {manifest.sam.get('model_type')})"
        )
    if precision is not None and precision != manifest.precision:
        problems.append(f"amg.precision differs (run: {precision}, shards: {manifest.precision})")
    if problems:
        raise ShardSetError(
            f"shard set {directory} was made for another configuration: "
            + "; ".join(problems)
            + ". Point the run at a matching shard set or re-extract this one."
        )


def shard_urls(directory: str | Path, manifest: Manifest) -> list[str]:
    return [str(p) for p in listed_shards(directory, manifest.shards, MANIFEST_NAME, ShardSetError)]


def iter_records(directory: str | Path) -> Iterator[ImageRecord]:
    """Every image of a finished shard set, in manifest order, in this process."""
    manifest = read_manifest(directory)
    yield from map(decode_sample, sequential_dataset(shard_urls(directory, manifest)))


def _scan_shard(directory: Location, name: str) -> dict[str, Any]:
    """Keys and mask count of a complete shard (used when resuming), read front to back."""
    keys: list[str] = []
    masks = 0
    with storage.open_binary(storage.join(directory, name)) as stream:
        for member in (tar := tarfile.open(fileobj=stream, mode="r|")):
            key, _, entry = member.name.partition(".")
            if entry == "meta.json":
                keys.append(key)
            elif entry == "iou_preds.npy":
                masks += int(_load_npy(tar.extractfile(member).read()).shape[0])
    return {"name": name, "images": len(keys), "masks": masks, "keys": keys}


def existing_keys(directory: str | Path) -> set[str]:
    """Keys in the complete shards of a (possibly unfinished) shard set."""
    directory = storage.location(directory)
    return {
        key
        for name in storage.file_names(directory, f"{_SHARD_PREFIX}*.tar")
        for key in _scan_shard(directory, name)["keys"]
    }


class ShardSetWriter:
    """Write image records into a shard set; resumes an interrupted one.

    ``done_keys`` holds the images already in complete shards: callers skip them.
    Use as a context manager; on a clean exit the manifest is written, on an
    exception the open shard is still finalised so no written image is lost.

    Several processes may write into one directory at once, each with its own
    ``series`` (e.g. ``"r1-"`` for rank 1) and ``write_manifest=False``; one of
    them calls :meth:`finalize` after all have closed, which lists every shard.
    """

    def __init__(
        self,
        directory: str | Path,
        manifest: Manifest,
        *,
        images_per_shard: int = 500,
        series: str = "",
        write_manifest: bool = True,
    ) -> None:
        self.directory = storage.location(directory)
        if storage.is_file(storage.join(self.directory, MANIFEST_NAME)):
            raise ShardSetError(
                f"{self.directory} already holds a finished shard set; delete it or write elsewhere"
            )
        if series and not KEY_PATTERN.match(series):
            raise ShardSetError(f"shard series {series!r} may only use [A-Za-z0-9_-]")
        storage.make_folder(self.directory)
        self.series = series
        self._staging = storage.staging_folder(self.directory, f"{_SHARD_PREFIX}{series}*.tmp")
        self.manifest = manifest
        self.images_per_shard = images_per_shard
        self.write_manifest = write_manifest
        finished = storage.file_names(self.directory, f"{_SHARD_PREFIX}*.tar")
        scanned = [_scan_shard(self.directory, name) for name in finished]
        self.done_keys: set[str] = {k for s in scanned for k in s.pop("keys")}
        self.manifest.shards = scanned
        self._pending = storage.join(self.directory, "pending.json")  # the config it is begun with
        begun = storage.read_json(self._pending, missing={})
        if scanned:  # bf16 and fp32 never mix: finished as begun (without pending.json: fp32)
            check_manifest(replace(manifest, config=begun), directory, precision=manifest.precision)
        atomic_write_text(self._pending, json.dumps(manifest.config))
        own = storage.file_names(self.directory, f"{_SHARD_PREFIX}{series}[0-9]*.tar")
        self._own_shards = len(own)
        self._tar: wds.TarWriter | None = None
        self._tmp_path: Path | None = None
        self._open_stats: dict[str, Any] = {}

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._finish_shard()
        if exc_type is None and self.write_manifest:
            self.finalize()

    def write(self, record: ImageRecord) -> None:
        if record.key in self.done_keys:
            raise ShardSetError(f"image {record.key!r} is already in {self.directory}")
        sample = encode_record(record, self.manifest.embed_dim)
        if self._tar is None:
            self._start_shard()
        self._tar.write(sample)
        self.done_keys.add(record.key)
        self._open_stats["images"] += 1
        self._open_stats["masks"] += record.num_masks
        if self._open_stats["images"] >= self.images_per_shard:
            self._finish_shard()

    def finalize(self) -> Manifest:
        """Write the manifest over every complete shard in the directory, from any writer."""
        self._finish_shard()
        known = {s["name"] for s in self.manifest.shards}
        for name in storage.file_names(self.directory, f"{_SHARD_PREFIX}*.tar"):
            if name not in known:
                stats = _scan_shard(self.directory, name)
                stats.pop("keys")
                self.manifest.shards.append(stats)
        self.manifest.shards.sort(key=lambda s: s["name"])
        listing = json.dumps(self.manifest.to_json(), indent=2)
        atomic_write_text(storage.join(self.directory, MANIFEST_NAME), listing)
        storage.remove(self._pending)
        return self.manifest

    def _start_shard(self) -> None:
        name = f"{_SHARD_PREFIX}{self.series}{self._own_shards:06d}.tar"
        self._own_shards += 1
        self._tmp_path = self._staging / (name + ".tmp")
        self._tar = wds.TarWriter(str(self._tmp_path), encoder=False)
        self._open_stats = {"name": name, "images": 0, "masks": 0}

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        storage.publish(self._tmp_path, storage.join(self.directory, self._open_stats["name"]))
        self.manifest.shards.append(self._open_stats)
        self._tar = None
