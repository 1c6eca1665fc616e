"""Evaluation datasets with pixel ground truth: VOC, COCO (JSON or YOLO-seg), ADE20K.

Each reader is an :class:`usam.data.sources.ImageSource` whose images carry a small
JSON-able ``ground_truth`` reference (stored in the embedding shards), and
:func:`load_ground_truth` turns a reference back into masks at evaluation time,
in the run vocabulary's class indices. Images are read on their stored pixel grid,
without EXIF rotation, because that is the grid their masks were drawn on.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from usam.core.labels import IGNORE, ignore_value
from usam.core.vocabulary import Vocabulary, check_classes, load_vocabulary
from usam.data.ground_truth import (
    DatasetError,
    GroundTruth,
    Instance,
    check_class_count,
    check_size,
    check_values,
    instances_from_semantic,
    paint_instances,
    parse_yolo_polygons,
    png_size,
    read_index_png,
    require_dir,
    to_superclasses,
)
from usam.data.sources import (
    ImageSource,
    SourceImage,
    check_unique_keys,
    file_stamp,
    image_key,
    load_rgb,
)
from usam.formats.image_shards import IMAGE_SUFFIXES

SOURCE_KEY = "eval_data.source"  # the config key usam.eval and usam.fit build these from


class VOCSegmentation(ImageSource):
    """PASCAL VOC 2012 segmentation in the VOCdevkit layout (``root`` holds ``JPEGImages/``)."""

    def __init__(self, root: str | Path, split: str = "val") -> None:
        super().__init__(load_vocabulary("voc20").classes, "eval")
        self.root = Path(root).resolve()
        self.split = split
        require_dir(
            self.root / "JPEGImages",
            f"set {SOURCE_KEY}.root to the VOC2012 folder of a VOCdevkit (it holds JPEGImages/ "
            "and SegmentationClass/)",
        )
        lists = self.root / "ImageSets" / "Segmentation"
        split_file = lists / f"{split}.txt"
        if not split_file.is_file():
            found = sorted(p.stem for p in lists.glob("*.txt"))
            where = f"splits found: {found or 'none'} ({SOURCE_KEY}.split)"
            raise DatasetError(f"no split list {split_file}; {where}")
        self.ids = []
        for image_id in split_file.read_text().split():
            missing = [p for p in self._files(image_id) if not p.is_file()]
            for path in missing:
                self.listing_rejected.append((str(path), f"listed in {split}.txt but missing"))
            if not missing:
                self.ids.append(image_id)
        self.keys = tuple(image_key(i) for i in self.ids)
        check_unique_keys(self.keys, self.ids, split_file)

    def _files(self, image_id: str) -> tuple[Path, Path]:
        return (
            self.root / "JPEGImages" / f"{image_id}.jpg",
            self.root / "SegmentationClass" / f"{image_id}.png",
        )

    def load(self, index: int) -> SourceImage:
        image_id = self.ids[index]
        jpeg, mask = self._files(image_id)
        image = load_rgb(jpeg, upright=False)
        check_size(image, png_size(mask), jpeg, str(mask))
        return SourceImage(
            key=self.keys[index],
            image=image,
            ground_truth={"dataset": "voc", "root": str(self.root), "id": image_id},
            source={"type": "voc", "split": self.split, "id": image_id},
        )

    def _inputs(self) -> Any:
        objects = self.root / "SegmentationObject"
        stamps = []
        for image_id in self.ids:
            paths = [*self._files(image_id), objects / f"{image_id}.png"]
            stamps.append([file_stamp(p, self.root) for p in paths if p.is_file()])
        return {"root": str(self.root), "split": self.split, "files": stamps}


def _voc_truth(ref: dict[str, Any]) -> tuple[GroundTruth, tuple[str, ...]]:
    root, image_id = Path(ref["root"]), ref["id"]
    classes = load_vocabulary("voc20").classes
    class_png = root / "SegmentationClass" / f"{image_id}.png"
    semantic = check_values(read_index_png(class_png), len(classes), class_png)
    object_png = root / "SegmentationObject" / f"{image_id}.png"
    if not object_png.is_file():
        return GroundTruth(semantic, instances_from_semantic(semantic), True), classes
    objects = read_index_png(object_png)
    if objects.shape != semantic.shape:
        raise DatasetError(f"{object_png} and {class_png} differ in size")
    instances = []
    for value in np.unique(objects):
        if 0 < value < IGNORE:
            mask = objects == value
            labels = semantic[mask]
            labels = labels[(labels > 0) & (labels < IGNORE)]
            if labels.size:  # the class of an object is what SegmentationClass says it is
                instances.append(Instance(mask, int(np.bincount(labels).argmax()) - 1))
    return GroundTruth(semantic, instances, False), classes


# ---------------------------------------------------------------- COCO instances JSON


@lru_cache(maxsize=2)
def _coco(annotation_file: str) -> COCO:
    """A parsed COCO annotation file; cached because every image's ground truth needs it."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(
            f"COCO annotation file {path} does not exist; fix {SOURCE_KEY}.annotation_file"
        )
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatasetError(f"{path} is not a COCO instances file ({error!r})") from error
    for section in ("images", "annotations", "categories"):
        if section not in coco.dataset:
            raise DatasetError(f"{path} has no '{section}' list; it is not a COCO instances file")
    return coco


def _coco_categories(coco: COCO, where: str) -> tuple[list[int], tuple[str, ...]]:
    """Category ids in id order (class index = position) and their normalised names."""
    ids = sorted(coco.cats)
    return ids, check_classes([coco.cats[i]["name"] for i in ids], where)


class COCOInstances(ImageSource):
    """A COCO instances JSON (polygons or RLE) with its image folder."""

    def __init__(self, image_dir: str | Path, annotation_file: str | Path) -> None:
        self.annotation_file = Path(annotation_file).resolve()
        coco = _coco(str(self.annotation_file))
        _, classes = _coco_categories(coco, str(self.annotation_file))
        super().__init__(check_class_count(classes, self.annotation_file), "eval")
        self.image_dir = require_dir(
            Path(image_dir).resolve(),
            f"set {SOURCE_KEY}.image_dir to the folder the annotation's file_name entries are in",
        )
        self.images = []
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            if (self.image_dir / info["file_name"]).is_file():
                self.images.append(info)
            else:
                path = self.image_dir / info["file_name"]
                self.listing_rejected.append((str(path), "in the annotation file but missing"))
        names = [str(Path(i["file_name"]).with_suffix("")) for i in self.images]
        self.keys = tuple(image_key(n) for n in names)
        check_unique_keys(self.keys, names, self.annotation_file)

    def load(self, index: int) -> SourceImage:
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        image = load_rgb(path, upright=False)
        where = f"its entry in {self.annotation_file.name}"
        check_size(image, (info["width"], info["height"]), path, where)
        return SourceImage(
            key=self.keys[index],
            image=image,
            ground_truth={
                "dataset": "coco",
                "annotation_file": str(self.annotation_file),
                "image_id": info["id"],
            },
            source={"type": "coco", "file_name": info["file_name"], "image_id": info["id"]},
        )

    def _inputs(self) -> Any:
        return {
            "annotations": file_stamp(self.annotation_file, self.annotation_file.parent),
            "image_dir": str(self.image_dir),
            "images": [
                file_stamp(self.image_dir / i["file_name"], self.image_dir) for i in self.images
            ],
        }


def _coco_truth(ref: dict[str, Any]) -> tuple[GroundTruth, tuple[str, ...]]:
    coco = _coco(ref["annotation_file"])
    ids, classes = _coco_categories(coco, ref["annotation_file"])
    index = {cat_id: i for i, cat_id in enumerate(ids)}
    info = coco.imgs[ref["image_id"]]
    instances = [
        Instance(coco.annToMask(a).astype(bool), index[a["category_id"]], bool(a.get("iscrowd")))
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]]))
    ]
    semantic = paint_instances(instances, (info["height"], info["width"]), len(classes))
    return GroundTruth(semantic, instances, False), classes


# ---------------------------------------------------------------- YOLO-seg polygons


class YOLOSegmentation(ImageSource):
    """YOLO-seg polygons: ``images/<split>/*`` with ``labels/<split>/<stem>.txt``.

    An image without a label file is all background; a label file without an
    image is reported in ``rejected``. ``classes`` is the class list the indices
    refer to (a packaged vocabulary name, a JSON path or the names themselves).
    """

    def __init__(
        self, root: str | Path, split: str = "train2017", classes: str | Sequence[str] = "coco80"
    ) -> None:
        vocabulary = load_vocabulary(classes)
        super().__init__(check_class_count(vocabulary.classes, vocabulary.name), "eval")
        self.vocabulary = classes if isinstance(classes, str) else list(vocabulary.classes)
        self.root = Path(root).resolve()
        self.split = split
        where = f"set {SOURCE_KEY}.root to the folder holding images/<split>/ and labels/<split>/"
        image_dir = require_dir(self.root / "images" / split, where)
        label_dir = self.root / "labels" / split
        self.images = sorted(
            p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        stems = {p.stem for p in self.images}
        labels = sorted(label_dir.glob("*.txt")) if label_dir.is_dir() else []
        for label in labels:
            if label.stem not in stems:
                self.listing_rejected.append((str(label), "label file without an image"))
        self.labels = {p.stem: p for p in labels if p.stem in stems}
        self.keys = tuple(image_key(p.stem) for p in self.images)
        check_unique_keys(self.keys, [p.name for p in self.images], image_dir)

    def load(self, index: int) -> SourceImage:
        path = self.images[index]
        image = load_rgb(path, upright=False)
        label = self.labels.get(path.stem)
        if label is not None:  # fail on a broken label file now, not after extraction
            parse_yolo_polygons(label, len(self.classes))
        return SourceImage(
            key=self.keys[index],
            image=image,
            ground_truth={
                "dataset": "yolo",
                "root": str(self.root),
                "label": None if label is None else label.relative_to(self.root).as_posix(),
                "height": image.height,
                "width": image.width,
                "vocabulary": self.vocabulary,
            },
            source={"type": "yolo", "split": self.split, "file": path.name},
        )

    def _inputs(self) -> Any:
        files = [
            [file_stamp(p, self.root)]
            + ([file_stamp(self.labels[p.stem], self.root)] if p.stem in self.labels else [])
            for p in self.images
        ]
        return {"root": str(self.root), "split": self.split, "files": files}


def _yolo_truth(ref: dict[str, Any]) -> tuple[GroundTruth, tuple[str, ...]]:
    classes = load_vocabulary(ref["vocabulary"]).classes
    height, width = ref["height"], ref["width"]
    instances = []
    if ref["label"] is not None:
        path = Path(ref["root"]) / ref["label"]
        for label, points in parse_yolo_polygons(path, len(classes)):
            pixels = (points * [width, height]).ravel().tolist()
            rle = mask_utils.merge(mask_utils.frPyObjects([pixels], height, width))
            instances.append(Instance(mask_utils.decode(rle).astype(bool), label))
    semantic = paint_instances(instances, (height, width), len(classes))
    return GroundTruth(semantic, instances, False), classes


# ---------------------------------------------------------------- ADE20K scene parsing


@lru_cache(maxsize=4)
def read_ade_classes(path: str) -> tuple[str, ...]:
    """Class names of an ``objectInfo150.txt`` (tab-separated; the first synonym of Name)."""
    lines = Path(path).read_text().splitlines()
    if not lines or "Name" not in lines[0].split("\t"):
        raise DatasetError(f"{path} is not an objectInfo150.txt (no tab-separated 'Name' header)")
    column = lines[0].split("\t").index("Name")
    names = [line.split("\t")[column].split(",")[0] for line in lines[1:] if line.strip()]
    return check_classes(names, path)


class ADE20K(ImageSource):
    """ADE20K scene parsing: ``images/<split>/*.jpg``, ``annotations/<split>/*.png``
    ('L', 0 = unlabelled, 1..150 = classes) and ``objectInfo150.txt``."""

    def __init__(self, root: str | Path, split: str = "validation") -> None:
        self.root = Path(root).resolve()
        classes_file = self.root / "objectInfo150.txt"
        if not classes_file.is_file():
            where = f"set {SOURCE_KEY}.root to the ADEChallengeData2016 folder, which holds it"
            raise DatasetError(f"no class list {classes_file}; {where}")
        classes = check_class_count(read_ade_classes(str(classes_file)), classes_file)
        super().__init__(classes, "eval")
        self.split = split
        where = f"expected under {SOURCE_KEY}.root, split {SOURCE_KEY}.split"
        image_dir = require_dir(self.root / "images" / split, where)
        mask_dir = require_dir(self.root / "annotations" / split, where)
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        masks = {p.stem: p for p in mask_dir.glob("*.png")}
        for stem in sorted(images.keys() ^ masks.keys()):
            path, other = (images[stem], "annotation") if stem in images else (masks[stem], "image")
            self.listing_rejected.append((str(path), f"no matching {other}"))
        self.ids = sorted(images.keys() & masks.keys())
        self.images = [images[i] for i in self.ids]
        self.masks = [masks[i] for i in self.ids]
        self.keys = tuple(image_key(i) for i in self.ids)
        check_unique_keys(self.keys, self.ids, image_dir)

    def load(self, index: int) -> SourceImage:
        path, mask = self.images[index], self.masks[index]
        image = load_rgb(path, upright=False)
        check_size(image, png_size(mask), path, str(mask))
        return SourceImage(
            key=self.keys[index],
            image=image,
            ground_truth={
                "dataset": "ade20k",
                "root": str(self.root),
                "annotation": mask.relative_to(self.root).as_posix(),
            },
            source={"type": "ade20k", "split": self.split, "id": self.ids[index]},
        )

    def _inputs(self) -> Any:
        files = [
            [file_stamp(i, self.root), file_stamp(m, self.root)]
            for i, m in zip(self.images, self.masks)
        ]
        return {"root": str(self.root), "split": self.split, "files": files}


def _ade_truth(ref: dict[str, Any]) -> tuple[GroundTruth, tuple[str, ...]]:
    root = Path(ref["root"])
    classes = read_ade_classes(str(root / "objectInfo150.txt"))
    path = root / ref["annotation"]
    raw = check_values(read_index_png(path), len(classes), path)  # in the classes' layout
    semantic = np.where(raw == 0, ignore_value(raw.dtype), raw)  # no background: 0 is ignore
    return GroundTruth(semantic, instances_from_semantic(semantic), True, False), classes


# ---------------------------------------------------------------- dispatch

_READERS = {"voc": _voc_truth, "coco": _coco_truth, "yolo": _yolo_truth, "ade20k": _ade_truth}


def load_ground_truth(ref: dict[str, Any], vocabulary: Vocabulary | None = None) -> GroundTruth:
    """The masks a ``ground_truth`` reference points to, in ``vocabulary``'s class indices.

    With no vocabulary, or one equal to the dataset's classes, indices are the
    dataset's own. A vocabulary whose ``parent`` is the dataset's class list (the
    VOC superclasses) gets the ground truth mapped onto its classes. Anything
    else fails: scoring against the wrong class order gives silent nonsense.
    """
    reader = _READERS.get(ref.get("dataset"))
    if reader is None:
        raise DatasetError(
            f"ground-truth reference {ref!r} names no known dataset ({', '.join(_READERS)})"
        )
    truth, classes = reader(ref)
    if vocabulary is None or vocabulary.classes == classes:
        return truth
    if vocabulary.parent is not None and load_vocabulary(vocabulary.parent).classes == classes:
        return to_superclasses(truth, vocabulary.parent_label_map())
    raise DatasetError(
        f"vocabulary '{vocabulary.name}' ({vocabulary.num_classes} classes) is neither the "
        f"{ref['dataset']} class list ({len(classes)} classes, starting {list(classes[:3])}) "
        "nor a grouping of it; evaluate with the dataset's own vocabulary"
    )
