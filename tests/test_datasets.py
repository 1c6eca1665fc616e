"""Dataset readers on tiny datasets written here, plus the real subsets when present."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from usam.core.vocabulary import load_vocabulary
from usam.data.eval_datasets import (
    ADE20K,
    COCOInstances,
    VOCSegmentation,
    YOLOSegmentation,
    load_ground_truth,
)
from usam.data.ground_truth import (
    DatasetError,
    GroundTruth,
    Instance,
    connected_components,
    to_superclasses,
)
from usam.formats.storage import KEY_PATTERN

from helpers.commands import SHARED_DATA

VOC_PERSON, VOC_CAT, VOC_CHAIR = 15, 8, 9  # values in VOC masks (class index + 1)


def _components_by_search(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """Reference 8-connected labelling by breadth-first search, pixel by pixel."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), set()
        while queue:
            r, c = queue.popleft()
            pixels.add((int(r), int(c)))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    inside = 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1]
                    if inside and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        found.append(pixels)
    return found


@pytest.mark.parametrize(
    ("density", "shape"), [(0.3, (23, 31)), (0.5, (23, 31)), (0.7, (23, 31)), (0.45, (240, 320))]
)
def test_connected_components_match_a_reference_search(density, shape):
    """The large mask is big enough for OpenCV to label it in parallel stripes."""
    rng = np.random.default_rng(int(density * 10))
    mask = rng.random(shape) < density
    ours = [{(int(r), int(c)) for r, c in zip(*np.nonzero(m))} for m in connected_components(mask)]
    assert ours == _components_by_search(mask)  # same regions, same (raster) order


def test_connected_components_join_diagonals_and_split_gaps():
    mask = np.array(
        [
            [1, 0, 0, 0, 1],
            [0, 1, 0, 0, 1],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 0, 1],
        ],
        dtype=bool,
    )
    sizes = [int(m.sum()) for m in connected_components(mask)]
    assert sizes == [3, 2, 1]
    assert connected_components(np.zeros((3, 3), bool)) == []


# ---------------------------------------------------------------- VOC


def _index_png(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values.astype(np.uint8), mode="P")
    image.putpalette(list(np.random.default_rng(0).integers(0, 255, 768)))
    image.save(path)


def _voc(root: Path) -> Path:
    """Three images: two separate people, a cat touching a chair, a pair of touching people."""
    semantic = {}
    people = np.zeros((20, 30), np.uint8)
    people[2:8, 2:8] = VOC_PERSON
    people[10:18, 20:28] = VOC_PERSON
    people[1:9, 1] = 255  # void border on one side
    semantic["2008_000001"] = people
    pets = np.zeros((20, 30), np.uint8)
    pets[5:15, 5:15] = VOC_CAT
    pets[5:15, 15:25] = VOC_CHAIR
    semantic["2008_000002"] = pets
    pair = np.zeros((20, 30), np.uint8)
    pair[4:16, 4:24] = VOC_PERSON
    semantic["2008_000003"] = pair
    for image_id, values in semantic.items():
        _index_png(root / "SegmentationClass" / f"{image_id}.png", values)
        photo = Image.fromarray(np.full((20, 30, 3), 90, np.uint8))
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        photo.save(root / "JPEGImages" / f"{image_id}.jpg")
    objects = np.zeros((20, 30), np.uint8)
    objects[4:16, 4:14] = 1
    objects[4:16, 14:24] = 2
    _index_png(root / "SegmentationObject" / "2008_000003.png", objects)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("2008_000001\n2008_000002\n2008_000003\n2008_009999\n")
    (lists / "train.txt").write_text("2008_000002\n")
    return root


def test_voc_reader_lists_split_and_reports_missing(tmp_path):
    source = VOCSegmentation(_voc(tmp_path / "VOC2012"), "val")
    assert source.kind == "eval" and source.classes == load_vocabulary("voc20").classes
    assert source.keys == ("2008_000001", "2008_000002", "2008_000003")
    assert [Path(p).name for p, _ in source.listing_rejected] == [
        "2008_009999.jpg",
        "2008_009999.png",
    ]
    images = list(source)
    assert images[0].image.size == (30, 20) and images[0].image.mode == "RGB"
    assert images[0].ground_truth["id"] == "2008_000001"
    json.dumps(images[0].ground_truth)
    assert len(source.rejected) == 2
    assert VOCSegmentation(tmp_path / "VOC2012", "train").keys == ("2008_000002",)


def test_voc_ground_truth_from_class_masks_and_object_masks(tmp_path):
    source = VOCSegmentation(_voc(tmp_path / "VOC2012"), "val")
    refs = [source.load(i).ground_truth for i in range(3)]
    people = load_ground_truth(refs[0])
    assert people.semantic.dtype == np.uint8 and people.semantic.shape == (20, 30)
    assert set(np.unique(people.semantic)) == {0, VOC_PERSON, 255}
    assert people.instances_derived
    assert [(int(i.mask.sum()), i.label, i.iscrowd) for i in people.instances] == [
        (36, VOC_PERSON - 1, False),
        (64, VOC_PERSON - 1, False),
    ]
    pets = load_ground_truth(refs[1])  # touching objects of different classes stay apart
    assert sorted((i.label, int(i.mask.sum())) for i in pets.instances) == [
        (VOC_CAT - 1, 100),
        (VOC_CHAIR - 1, 100),
    ]
    pair = load_ground_truth(refs[2])  # SegmentationObject splits what components cannot
    assert not pair.instances_derived
    assert [(i.label, int(i.mask.sum())) for i in pair.instances] == [
        (VOC_PERSON - 1, 120),
        (VOC_PERSON - 1, 120),
    ]


def test_voc_superclasses(tmp_path):
    source = VOCSegmentation(_voc(tmp_path / "VOC2012"), "val")
    superclasses = load_vocabulary("voc_superclasses")
    pets = load_ground_truth(source.load(1).ground_truth, superclasses)
    animals, furniture = (
        superclasses.classes.index("animals"),
        superclasses.classes.index("furniture"),
    )
    assert pets.semantic[10, 10] == animals + 1 and pets.semantic[10, 20] == furniture + 1
    assert sorted(i.label for i in pets.instances) == sorted([animals, furniture])
    people = load_ground_truth(source.load(0).ground_truth, superclasses)
    assert people.semantic[1, 1] == 255 and people.semantic[0, 0] == 0
    assert people.semantic[3, 3] == superclasses.classes.index("person") + 1
    with pytest.raises(DatasetError, match="coco80"):
        load_ground_truth(source.load(0).ground_truth, load_vocabulary("coco80"))


def test_to_superclasses_ignores_unmapped_classes():
    semantic = np.array([[0, 1, 2, 255]], np.uint8)
    truth = GroundTruth(
        semantic, [Instance(semantic == 1, 0), Instance(semantic == 2, 1)], instances_derived=True
    )
    coarse = to_superclasses(truth, {0: 3})
    assert coarse.semantic.tolist() == [[0, 4, 255, 255]]
    assert [i.label for i in coarse.instances] == [3] and coarse.instances_derived


def test_voc_bad_inputs(tmp_path):
    root = _voc(tmp_path / "VOC2012")
    with pytest.raises(DatasetError, match=r"splits found: \['train', 'val'\]"):
        VOCSegmentation(root, "test")
    with pytest.raises(DatasetError, match="JPEGImages"):
        VOCSegmentation(tmp_path, "val")
    _index_png(root / "SegmentationClass" / "2008_000001.png", np.full((20, 30), 33))
    source = VOCSegmentation(root, "val")
    with pytest.raises(DatasetError, match=r"2008_000001.png holds values \[33\]"):
        load_ground_truth(source.load(0).ground_truth)
    _index_png(root / "SegmentationClass" / "2008_000002.png", np.zeros((10, 10)))
    with pytest.raises(DatasetError, match="2008_000002.jpg is 30x20 but .* is 10x10"):
        source.load(1)
    Image.new("RGB", (30, 20)).save(root / "SegmentationClass" / "2008_000003.png")
    with pytest.raises(DatasetError, match="'RGB' image"):
        load_ground_truth(source.load(2).ground_truth)
    with pytest.raises(DatasetError, match="no known dataset"):
        load_ground_truth({"dataset": "kitti"})


def test_datasets_keep_the_stored_pixel_grid(tmp_path):
    root = _voc(tmp_path / "VOC2012")
    photo = Image.new("RGB", (30, 20), (10, 200, 10))
    exif = photo.getexif()
    exif[0x0112] = 6  # a viewer would show it rotated; the mask was drawn unrotated
    photo.save(root / "JPEGImages" / "2008_000001.jpg", exif=exif.tobytes())
    assert VOCSegmentation(root, "val").load(0).image.size == (30, 20)


# ---------------------------------------------------------------- COCO JSON


def _coco(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(images / "000000000001.jpg")
    Image.new("RGB", (20, 10)).save(images / "000000000002.jpg")
    person = np.zeros((30, 40), np.uint8)
    person[5:25, 5:15] = 1
    rle = mask_utils.encode(np.asfortranarray(person))
    rle["counts"] = rle["counts"].decode()
    crowd = np.zeros((30, 40), np.uint8)
    crowd[0:10, 20:40] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode()
    payload = {
        "images": [
            {"id": 2, "file_name": "000000000002.jpg", "width": 20, "height": 10},
            {"id": 1, "file_name": "000000000001.jpg", "width": 40, "height": 30},
            {"id": 3, "file_name": "000000000003.jpg", "width": 8, "height": 8},
        ],
        "categories": [
            {"id": 18, "name": "Dog"},
            {"id": 1, "name": "person"},
            {"id": 3, "name": "car"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": rle, "iscrowd": 0},
            {  # a dog polygon inside the person's box, painted over it (smaller)
                "id": 11,
                "image_id": 1,
                "category_id": 18,
                "segmentation": [[8, 8, 12, 8, 12, 12, 8, 12]],
                "iscrowd": 0,
            },
            {"id": 12, "image_id": 1, "category_id": 3, "segmentation": crowd_rle, "iscrowd": 1},
        ],
    }
    annotation = root / "instances.json"
    annotation.write_text(json.dumps(payload))
    return images, annotation


def test_coco_reader_polygons_rle_and_crowds(tmp_path):
    images, annotation = _coco(tmp_path)
    source = COCOInstances(images, annotation)
    assert source.classes == ("person", "car", "dog")  # category id order, names normalised
    assert source.keys == ("000000000001", "000000000002")
    assert [Path(p).name for p, _ in source.listing_rejected] == ["000000000003.jpg"]
    first = source.load(0)
    assert first.image.size == (40, 30)
    truth = load_ground_truth(first.ground_truth)
    assert truth.semantic.shape == (30, 40) and not truth.instances_derived
    by_label = {i.label: i for i in truth.instances}
    assert int(by_label[0].mask.sum()) == 200 and not by_label[0].iscrowd
    assert by_label[1].iscrowd and int(by_label[1].mask.sum()) == 200
    assert by_label[2].mask[10, 10] and 9 <= int(by_label[2].mask.sum()) <= 25
    assert truth.semantic[10, 10] == 3  # dog over person
    assert truth.semantic[20, 10] == 1
    assert truth.semantic[5, 30] == 255  # crowd is ignore
    assert truth.semantic[20, 30] == 0
    empty = load_ground_truth(source.load(1).ground_truth)
    assert empty.instances == [] and not empty.semantic.any()
    assert load_ground_truth(first.ground_truth, load_vocabulary(["person", "car", "dog"]))


def test_coco_bad_inputs(tmp_path):
    images, annotation = _coco(tmp_path)
    Image.new("RGB", (21, 10)).save(images / "000000000002.jpg")
    with pytest.raises(DatasetError, match="is 21x10 but its entry in instances.json is 20x10"):
        COCOInstances(images, annotation).load(1)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="broken.json"):
        COCOInstances(images, broken)
    with pytest.raises(DatasetError, match="does not exist"):
        COCOInstances(images, tmp_path / "missing.json")


# ---------------------------------------------------------------- YOLO-seg


def _yolo(root: Path) -> Path:
    images, labels = root / "images" / "val", root / "labels" / "val"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    Image.new("RGB", (40, 20)).save(images / "a.jpg")
    Image.new("RGB", (10, 10)).save(images / "b.png")
    (images / "notes.md").write_text("not an image suffix")
    (labels / "a.txt").write_text(
        "1 0.25 0.25 0.75 0.25 0.75 0.75 0.25 0.75\n\n0 0 0 0.2 0 0.2 0.4\n"
    )
    (labels / "orphan.txt").write_text("0 0.1 0.1 0.2 0.1 0.2 0.2\n")
    return root


def test_yolo_reader_polygons_background_and_orphans(tmp_path):
    source = YOLOSegmentation(_yolo(tmp_path), "val", classes=["cat", "dog"])
    assert source.classes == ("cat", "dog") and source.keys == ("a", "b")
    assert [(Path(p).name, r) for p, r in source.listing_rejected] == [
        ("orphan.txt", "label file without an image")
    ]
    first = source.load(0)
    assert first.ground_truth["height"] == 20 and first.ground_truth["width"] == 40
    truth = load_ground_truth(json.loads(json.dumps(first.ground_truth)))
    dog, cat = truth.instances
    assert dog.label == 1 and cat.label == 0 and not truth.instances_derived
    rows, cols = np.nonzero(dog.mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 14, 10, 29)  # 0.25..0.75
    assert truth.semantic[10, 20] == 2 and truth.semantic[1, 6] == 1 and truth.semantic[6, 1] == 0
    assert truth.semantic[18, 35] == 0
    background = load_ground_truth(source.load(1).ground_truth)
    assert background.semantic.shape == (10, 10) and not background.semantic.any()
    assert background.instances == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("5 0.1 0.1 0.2 0.1 0.2 0.2", r"a.txt:1: class 5 is outside 0..1"),
        ("0 0.5 0.5 0.2 0.2", "box label"),
        ("0 0.1 0.1 0.2 0.1 0.2", "even count of at least 6"),
        ("cat 0.1 0.1 0.2 0.1 0.2 0.2", "not 'class x1 y1"),
    ],
)
def test_yolo_bad_labels_fail_at_load(tmp_path, line, message):
    root = _yolo(tmp_path)
    (root / "labels" / "val" / "a.txt").write_text(line + "\n")
    with pytest.raises(DatasetError, match=message):
        YOLOSegmentation(root, "val", classes=["cat", "dog"]).load(0)


# ---------------------------------------------------------------- ADE20K


def test_ade20k_reader(tmp_path):
    (tmp_path / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n2\t0.1\t1\t1\tbuilding, edifice\n"
        "3\t0.1\t1\t1\tsky\n"
    )
    images, masks = tmp_path / "images" / "validation", tmp_path / "annotations" / "validation"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    Image.new("RGB", (6, 4)).save(images / "ADE_val_1.jpg")
    Image.new("RGB", (6, 4)).save(images / "ADE_val_2.jpg")
    values = np.array([[0, 1, 1, 0, 3, 3]] * 2 + [[2] * 6] * 2, np.uint8)
    Image.fromarray(values, mode="L").save(masks / "ADE_val_1.png")
    source = ADE20K(tmp_path)
    assert source.classes == ("wall", "building", "sky") and source.keys == ("ADE_val_1",)
    assert [(Path(p).name, r) for p, r in source.listing_rejected] == [
        ("ADE_val_2.jpg", "no matching annotation")
    ]
    truth = load_ground_truth(source.load(0).ground_truth)
    assert truth.semantic.tolist()[0] == [255, 1, 1, 255, 3, 3]
    assert truth.instances_derived
    assert not truth.background_class  # 0 is unlabelled: mIoU averages the named classes
    assert sorted((i.label, int(i.mask.sum())) for i in truth.instances) == [
        (0, 4),
        (1, 12),
        (2, 4),
    ]
    Image.fromarray(values + 200, mode="L").save(masks / "ADE_val_1.png")
    with pytest.raises(DatasetError, match="outside 0..3"):
        load_ground_truth(source.load(0).ground_truth)


# ---------------------------------------------------------------- real subsets


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not on this machine")
def test_real_subsets_read_with_matching_shapes_and_classes():
    voc = VOCSegmentation(SHARED_DATA / "voc2012-mini", "val")
    coco = YOLOSegmentation(SHARED_DATA / "coco128-seg", "train2017")
    ade = ADE20K(SHARED_DATA / "ade20k-val100", "validation")
    assert (len(voc), len(coco), len(ade)) == (54, 128, 100)
    assert len(coco.listing_rejected) == 2  # label files without an image
    assert voc.listing_rejected == [] and ade.listing_rejected == []
    assert len(ade.classes) == 150 and ade.classes[:3] == ("wall", "building", "sky")
    for source, limit in ((voc, 21), (coco, 81), (ade, 151)):
        for index in (0, len(source) - 1):
            image = source.load(index)
            assert KEY_PATTERN.match(image.key)
            truth = load_ground_truth(image.ground_truth)
            assert truth.semantic.shape == (image.image.height, image.image.width)
            values = set(np.unique(truth.semantic).tolist()) - {255}
            assert values and max(values) < limit
            for instance in truth.instances:
                assert instance.mask.shape == truth.semantic.shape and instance.mask.any()
                assert 0 <= instance.label < limit - 1
    assert load_ground_truth(voc.load(0).ground_truth).instances_derived
    assert load_ground_truth(voc.load(0).ground_truth).background_class
    assert not load_ground_truth(coco.load(0).ground_truth).instances_derived
