"""Synthetic embedding shard sets: the training problem without SAM, for tests and the demo.

Each class has a prototype embedding; an image labelled with a class holds some
masks drawn around that prototype and more masks drawn around a few background
prototypes shared by all classes. That is the multiple-instance structure of
real SAM masks on single-object photos, with a known answer, so a head that
learns it proves the training path works. Numbers from these shards are not
results: the manifest says ``synthetic: true`` and every run reading them says so.

An ``eval`` set (:func:`write_synthetic_eval_set`) holds the same kind of images with
ground truth: a COCO instances file (LVIS's format) of the masks drawn from class
prototypes, so a vocabulary of any size (1,203 classes, LVIS's count) can be trained and
scored end to end without a dataset. :func:`numbered_classes` names such a vocabulary.

Run ``python -m usam.testing.synthetic --help`` to write a set by hand.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from usam.core.vocabulary import load_vocabulary
from usam.formats.embedding_shards import (
    DEFAULT_EMBED_DIM,
    ImageRecord,
    Manifest,
    ShardSetWriter,
    encode_mask,
    mixed_order,
)
from usam.formats.storage import atomic_write_text

IMAGE_SIZE = 64
BACKGROUND_PROTOTYPES = 8
_SPLIT_STREAMS = {"train": 1, "val": 2, "eval": 3}
GROUND_TRUTH_FILE = "instances.json"  # an eval set's COCO ground truth, beside its shards


def numbered_classes(count: int) -> list[str]:
    """``count`` made-up class names (``class 0000`` ...), not any dataset's, for sets
    whose size matters and whose names do not."""
    return [f"class {index:04d}" for index in range(count)]


def prototypes(num_classes: int, embed_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class and background prototypes; shared by the train and val splits of one seed."""
    rng = np.random.default_rng([seed, 0])
    classes = rng.standard_normal((num_classes, embed_dim)).astype(np.float32)
    background = rng.standard_normal((BACKGROUND_PROTOTYPES, embed_dim)).astype(np.float32)
    return classes, background


def _box_rle(rng: np.random.Generator) -> tuple[str, np.ndarray]:
    x0, y0 = rng.integers(0, IMAGE_SIZE - 8, size=2)
    w, h = rng.integers(4, IMAGE_SIZE - max(x0, y0), size=2)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    mask[y0 : y0 + h, x0 : x0 + w] = 1
    return encode_mask(mask)["counts"], np.array([x0, y0, w, h], dtype=np.float32)


def make_record(
    key: str,
    label_indices: Sequence[int],
    num_classes: int,
    class_protos: np.ndarray,
    background_protos: np.ndarray,
    rng: np.random.Generator,
    masks_per_image: tuple[int, int],
    foreground_fraction: float,
    noise: float,
) -> tuple[ImageRecord, np.ndarray]:
    """The image's record and each mask's class (-1 for masks of background prototypes)."""
    count = int(rng.integers(masks_per_image[0], masks_per_image[1] + 1))
    num_foreground = max(len(label_indices), int(round(count * foreground_fraction)))
    sources = [class_protos[label_indices[i % len(label_indices)]] for i in range(num_foreground)]
    sources += [
        background_protos[j]
        for j in rng.integers(0, len(background_protos), size=count - num_foreground)
    ]
    centres = np.stack(sources)
    embeddings = centres + noise * rng.standard_normal(centres.shape).astype(np.float32)
    order = rng.permutation(count)
    source_classes = [label_indices[i % len(label_indices)] for i in range(num_foreground)]
    mask_classes = np.array(source_classes + [-1] * (count - num_foreground))[order]
    rles, boxes = zip(*(_box_rle(rng) for _ in range(count)))
    boxes = np.stack(boxes)
    points = boxes[:, :2] + boxes[:, 2:] / 2
    labels = [0] * num_classes
    for index in label_indices:
        labels[index] = 1
    record = ImageRecord(
        key=key,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        embeddings=embeddings[order],
        iou_preds=rng.uniform(0.88, 1.0, count),
        stability=rng.uniform(0.95, 1.0, count),
        boxes=boxes,
        points=points,
        multimask=rng.integers(0, 3, count),
        rles=list(rles),
        labels=labels,
        source={"synthetic": True},
    )
    return record, mask_classes


def _manifest(
    classes: list[str], embed_dim: int, sam_model_type: str, config: dict, kind: str = "train"
) -> Manifest:
    manifest = Manifest(
        classes=classes,
        embed_dim=embed_dim,
        kind=kind,
        sam={"model_type": sam_model_type, "checkpoint_sha256": None, "random_weights": True},
        synthetic=True,
        config=config,
    )
    manifest.shuffle_seed = config["seed"]  # written mixed, as extraction writes a training set
    return manifest


def write_synthetic_shard_set(
    directory: str | Path,
    *,
    classes: str | Sequence[str],
    split: str = "train",
    images_per_class: int = 10,
    masks_per_image: Sequence[int] = (12, 48),
    foreground_fraction: float = 0.3,
    multi_label_fraction: float = 0.1,
    noise: float = 1.0,
    embed_dim: int = DEFAULT_EMBED_DIM,
    sam_model_type: str = "tiny",
    seed: int = 0,
    images_per_shard: int = 16,
) -> Manifest:
    """Write one split; the same seed gives the same prototypes for every split."""
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split={split!r} must be one of {sorted(_SPLIT_STREAMS)}")
    vocabulary = load_vocabulary(classes)
    num_classes = vocabulary.num_classes
    class_protos, background_protos = prototypes(num_classes, embed_dim, seed)
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    low, high = masks_per_image
    config = {
        "generator": "usam.testing.synthetic",
        "split": split,
        "images_per_class": images_per_class,
        "masks_per_image": [low, high],
        "foreground_fraction": foreground_fraction,
        "multi_label_fraction": multi_label_fraction,
        "noise": noise,
        "seed": seed,
    }
    manifest = _manifest(list(vocabulary.classes), embed_dim, sam_model_type, config)
    listed = [(c, i) for c in range(num_classes) for i in range(images_per_class)]
    with ShardSetWriter(directory, manifest, images_per_shard=images_per_shard) as writer:
        for position in mixed_order(len(listed), seed):
            class_index, image_index = listed[position]
            labels = [class_index]
            if num_classes > 1 and rng.random() < multi_label_fraction:
                labels.append(int((class_index + rng.integers(1, num_classes)) % num_classes))
            key = f"{split}_{class_index:03d}_{image_index:05d}"
            record, _ = make_record(
                key,
                labels,
                num_classes,
                class_protos,
                background_protos,
                rng,
                (low, high),
                foreground_fraction,
                noise,
            )
            if key not in writer.done_keys:
                writer.write(record)
    return writer.manifest


def write_synthetic_eval_set(
    directory: str | Path,
    *,
    classes: str | Sequence[str],
    images_per_class: int = 1,
    image_classes: Sequence[int] | None = None,
    masks_per_image: Sequence[int] = (12, 48),
    foreground_fraction: float = 0.3,
    noise: float = 1.0,
    embed_dim: int = DEFAULT_EMBED_DIM,
    sam_model_type: str = "tiny",
    seed: int = 0,
    images_per_shard: int = 16,
) -> Manifest:
    """An ``eval`` set on the prototypes of the train and val splits of ``seed``: one class
    per image, its class masks the instances of ``instances.json`` (COCO's format, as LVIS
    ships), which :func:`usam.data.eval_datasets.load_ground_truth` reads like any other.
    ``image_classes`` (class indices) limits the images to those classes: every class
    stays in the vocabulary, and a large one is scored without an image of each."""
    directory = Path(directory)
    vocabulary = load_vocabulary(classes)
    shown = _class_indices(image_classes, vocabulary.num_classes)
    low, high = masks_per_image
    config = {
        "generator": "usam.testing.synthetic",
        "split": "eval",
        "images_per_class": images_per_class,
        "image_classes": shown if image_classes is not None else None,
        "masks_per_image": [low, high],
        "foreground_fraction": foreground_fraction,
        "noise": noise,
        "seed": seed,
    }
    manifest = _manifest(list(vocabulary.classes), embed_dim, sam_model_type, config, "eval")
    draw = _eval_drawer(
        vocabulary.num_classes, embed_dim, seed, (low, high), foreground_fraction, noise
    )
    annotation_file = directory.resolve() / GROUND_TRUTH_FILE
    reference = {"dataset": "coco", "annotation_file": str(annotation_file)}
    images, annotations = [], []
    with ShardSetWriter(directory, manifest, images_per_shard=images_per_shard) as writer:
        for class_index in shown:
            for image_index in range(images_per_class):
                key = f"eval_{class_index:04d}_{image_index:05d}"
                record, mask_classes = draw(key, [class_index])
                image_id = len(images) + 1
                images.append(
                    {"id": image_id, "file_name": key, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
                )
                annotations += _instances(record, mask_classes, image_id, len(annotations))
                truth = {**reference, "image_id": image_id}
                if key not in writer.done_keys:
                    writer.write(replace(record, labels=None, ground_truth=truth))
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(vocabulary.classes)]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        atomic_write_text(annotation_file, json.dumps(coco))
    return writer.manifest


def _eval_drawer(
    num_classes: int,
    embed_dim: int,
    seed: int,
    masks_per_image: tuple[int, int],
    foreground_fraction: float,
    noise: float,
):
    """``make_record`` for the eval split of ``seed``, on its train and val prototypes."""
    class_protos, background_protos = prototypes(num_classes, embed_dim, seed)
    return partial(
        make_record,
        num_classes=num_classes,
        class_protos=class_protos,
        background_protos=background_protos,
        rng=np.random.default_rng([seed, _SPLIT_STREAMS["eval"]]),
        masks_per_image=masks_per_image,
        foreground_fraction=foreground_fraction,
        noise=noise,
    )


def _class_indices(chosen: Sequence[int] | None, num_classes: int) -> list[int]:
    if chosen is None:
        return list(range(num_classes))
    if not chosen or not all(0 <= int(c) < num_classes for c in chosen):
        raise ValueError(f"image_classes={list(chosen)}: not class indices 0..{num_classes - 1}")
    return [int(c) for c in chosen]


def _instances(
    record: ImageRecord, mask_classes: np.ndarray, image_id: int, numbered: int
) -> list[dict]:
    """COCO annotations of the record's class masks, ids following ``numbered`` earlier."""
    found = []
    for counts, label in zip(record.rles, mask_classes.tolist()):
        if label < 0:
            continue
        rle = {"size": [record.height, record.width], "counts": counts}
        found.append(
            {
                "id": numbered + len(found) + 1,
                "image_id": image_id,
                "category_id": label + 1,
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": mask_utils.toBbox(rle).tolist(),
                "iscrowd": 0,
            }
        )
    return found


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--classes", default="voc20", help="vocabulary name or JSON path")
    parser.add_argument("--split", default="train", choices=sorted(_SPLIT_STREAMS))
    parser.add_argument("--images-per-class", type=int, default=10)
    parser.add_argument("--masks-per-image", type=int, nargs=2, default=(12, 48))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embed-dim", type=int, default=DEFAULT_EMBED_DIM)
    args = parser.parse_args(argv)
    manifest = write_synthetic_shard_set(
        args.directory,
        classes=args.classes,
        split=args.split,
        images_per_class=args.images_per_class,
        masks_per_image=args.masks_per_image,
        seed=args.seed,
        embed_dim=args.embed_dim,
    )
    print(
        f"wrote {manifest.num_images} images, {manifest.num_masks} masks in "
        f"{len(manifest.shards)} shards to {args.directory} (SYNTHETIC embeddings, not SAM)"
    )


if __name__ == "__main__":
    main()
