"""The review readers: usam's own Label Studio and CVAT exports, submitted unchanged, read back
to exactly the masks written; every unusable task, image and region is one exact line."""

from __future__ import annotations

import json
import re
import socket

import jwt
import numpy as np
import pytest
from label_studio_sdk.converter import brush
from PIL import Image

from usam.inference.cvat import write_cvat
from usam.inference.label_studio import ImageAddresses, LabelStudioSettings, write_label_studio
from usam.inference.polygons import part_polygons
from usam.review.cvat_xml import review_of_cvat
from usam.review.label_studio_tasks import review_of_tasks, task_file_name
from usam.review.read import read_review
from usam.review.reviewed import ReviewError

from helpers.reviews import (
    brush_region,
    polygon_region,
    reviewed_images,
    save_images,
    submitted,
    write_export,
)

CLASSES = ("cat", "dog", "traffic light")


def label_studio_export(tmp_path, polygons: bool) -> list[dict]:
    addresses = ImageAddresses(LabelStudioSettings(url_prefix="s3://bucket/set"), tmp_path)
    write_label_studio(tmp_path / "ls", reviewed_images(), CLASSES, addresses, "usam", polygons)
    return submitted(json.loads((tmp_path / "ls" / "tasks.json").read_text()))


def images_root(tmp_path):
    """The images of ``reviewed_images`` on disk, which the one without regions takes its
    size from."""
    root = tmp_path / "images"
    save_images(root, {"a/first.png": (50, 40), "second.png": (23, 17), "empty.png": (20, 30)})
    return root


def assert_reads_back(review, images=None) -> None:
    """Every image written, in order, with its masks pixel for pixel and its classes."""
    images = reviewed_images() if images is None else images
    assert [image.file_name for image in review.images] == [i.file_name for i in images]
    for got, written in zip(review.images, images, strict=True):
        prediction = written.prediction
        assert (got.height, got.width) == (prediction.height, prediction.width)
        assert got.labels.tolist() == prediction.labels.tolist()
        np.testing.assert_array_equal(got.masks, prediction.masks())


@pytest.mark.parametrize("polygons", [False, True])
def test_a_submitted_label_studio_export_reads_back_exactly(tmp_path, polygons):
    """With polygons, usam's outlines of a brush still there are that brush, not more
    objects."""
    tasks = label_studio_export(tmp_path, polygons)
    if polygons:
        assert [r["id"] for r in tasks[0]["annotations"][0]["result"]] == [
            *("m0", "m0p0", "m1", "m1p0", "m1p1", "m2", "m2p0"),
        ]
    review = read_review(str(write_export(tmp_path, tasks)), CLASSES, images_root(tmp_path))
    assert_reads_back(review)  # the image without regions takes its file's size
    assert review.skipped == ()
    assert review.source == str(tmp_path / "export.json")
    assert review.classes == CLASSES


def test_outlines_whose_brush_was_deleted_are_one_object_per_class(tmp_path):
    """The outlines fill back to exactly the mask they were traced from (IoU 1, measured on
    holes, parts and single pixels), so an object survives its brush being deleted."""
    tasks = label_studio_export(tmp_path, polygons=True)
    for task in tasks:
        result = task["annotations"][0]["result"]
        result[:] = [region for region in result if region["type"] == "polygonlabels"]
    export = write_export(tmp_path, tasks)
    assert_reads_back(read_review(str(export), CLASSES, images_root(tmp_path)))
    result = tasks[0]["annotations"][0]["result"]
    result[2]["value"]["polygonlabels"] = ["cat"]  # m1p1, the second part of m1, relabelled
    triangle = [[60, 0], [100, 0], [100, 12.5]]  # (30, 0), (50, 0), (50, 5) in pixels
    result.append(polygon_region("drawn", triangle, ["dog"], (40, 50)))
    image = review_of_tasks(tasks, CLASSES, "export.json").images[0]
    assert image.labels.tolist() == [0, 2, 0, 1, 1]
    written = reviewed_images()[0].prediction.masks()
    first_part = written[1].copy()
    first_part[32:] = False
    np.testing.assert_array_equal(image.masks[1], first_part)
    np.testing.assert_array_equal(image.masks[2], written[1] & ~first_part)
    np.testing.assert_array_equal(image.masks[3], written[2])
    rows, columns = np.mgrid[:40, :50] + 0.5  # pixel centres, none on the triangle's edges
    np.testing.assert_array_equal(image.masks[4], rows < (columns - 30) / 4)
    assert image.masks[4].sum() == 18 + 14 + 10 + 6 + 2


def test_a_submitted_cvat_export_reads_back_exactly(tmp_path):
    write_cvat(tmp_path / "cvat", reviewed_images(), CLASSES)
    path = tmp_path / "cvat" / "annotations.xml"
    review = read_review(str(path), CLASSES, None)
    assert_reads_back(review)
    assert (review.source, review.skipped) == (str(path), ())


def test_cvat_polygons_in_pixels_fill_back_exactly(tmp_path):
    (labelled, *_) = reviewed_images()
    masks = labelled.prediction.masks()
    shapes = "".join(
        f'<polygon label="{CLASSES[label]}" points="{";".join(f"{x},{y}" for x, y in outline)}"/>'
        for label, mask in zip(labelled.prediction.labels, masks)
        for outline in part_polygons(mask)[:1]
    )
    path = tmp_path / "polygons.xml"
    path.write_text(
        f'<annotations><image id="0" name="p.png" width="50" height="40">{shapes}</image>'
        "</annotations>"
    )
    (image,) = review_of_cvat(path, CLASSES).images
    assert image.labels.tolist() == [0, 2, 1]
    first_part = masks[1].copy()
    first_part[32:] = False
    np.testing.assert_array_equal(image.masks, [masks[0], first_part, masks[2]])


def test_each_unusable_label_studio_task_and_region_is_one_line(tmp_path):
    mask = np.zeros((30, 40), bool)
    mask[3:9, 4:12] = True
    bad_rle = brush_region("bad-rle", mask, ["cat"])
    bad_rle["value"]["rle"] = bad_rle["value"]["rle"][:9]
    no_size = brush_region("no-size", mask, ["cat"])
    del no_size["original_width"]
    rectangle = {"id": "box", "type": "rectanglelabels", "original_height": 30}
    result = [
        brush_region("kept", mask, ["dog"]),
        brush_region("unknown", mask, ["horse"]),
        brush_region("two", mask, ["cat", "dog"]),
        brush_region("empty", np.zeros((30, 40), bool), ["cat"]),
        bad_rle,
        brush_region("other-size", np.ones((30, 41), bool), ["cat"]),
        polygon_region("line", [[10, 10], [50, 50]], ["cat"], (30, 40)),
        rectangle | {"original_width": 40, "value": {"rectanglelabels": ["cat"]}},
        no_size,
    ]
    annotation = {"id": 7, "result": result, "was_cancelled": False}
    cancelled = {"id": 8, "result": result, "was_cancelled": True}
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=photos/a%20b.jpg"}},
        {"id": 2, "data": {"file_name": "c.jpg"}, "annotations": [cancelled]},
        {"id": 3, "data": {"file_name": "d.jpg"}, "annotations": [cancelled, annotation]},
        {"id": 4, "data": {}, "annotations": [annotation]},
        {"id": 5, "data": {"file_name": "d.jpg"}, "annotations": [annotation]},
        {"id": 6, "data": {"file_name": "none.jpg"}, "annotations": [annotation | {"result": []}]},
    ]
    review = review_of_tasks(tasks, CLASSES, "export.json")
    where = "task 3 (d.jpg) region"
    assert review.skipped == (
        "task 1 (photos/a b.jpg): no submitted annotation, skipped",
        "task 2 (c.jpg): no submitted annotation (1 cancelled), skipped",
        f"{where} unknown: label 'horse' is not one of the classes (cat, dog, traffic light), "
        "skipped",
        f"{where} two: 2 labels (cat, dog), one is needed, skipped",
        f"{where} empty: empty mask, skipped",
        f"{where} bad-rle: malformed RLE (its runs do not decode), skipped",
        f"{where} other-size: its image is 41 x 30, the task's other regions' 40 x 30, skipped",
        f"{where} line: a polygon of 2 points, at least 3 are needed, skipped",
        f"{where} box: rectanglelabels regions are not read (only brushlabels and "
        "polygonlabels), skipped",
        f"{where} no-size: no original_width and original_height, skipped",
        "task 4: no data.file_name or data.image names its image, skipped",
        "task 5 (d.jpg): the same image as task 3, skipped",
    )
    kept, nothing = review.images
    assert (kept.file_name, kept.labels.tolist(), kept.masks.shape) == ("d.jpg", [1], (1, 30, 40))
    np.testing.assert_array_equal(kept.masks[0], mask)
    assert (nothing.file_name, nothing.masks.shape) == ("none.jpg", (0, 0, 0))
    save_images(tmp_path, {"d.jpg": (40, 31), "none.jpg": (25, 15)})
    on_disk = read_review(str(write_export(tmp_path, tasks)), CLASSES, tmp_path)
    assert on_disk.skipped[-1] == (
        f"d.jpg: {tmp_path / 'd.jpg'} is 40 x 31 but its masks are 40 x 30, skipped"
    )
    (nothing,) = on_disk.images
    assert (nothing.height, nothing.width, nothing.masks.shape) == (15, 25, (0, 15, 25))


def test_the_latest_submitted_annotation_is_read():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    older = {"result": [brush_region("a", mask, ["cat"])], "updated_at": "2026-01-02T00:00:00Z"}
    newer = {"result": [brush_region("a", mask, ["dog"])], "updated_at": "2026-01-03T00:00:00Z"}
    withdrawn = {"result": [], "updated_at": "2026-01-04T00:00:00Z", "was_cancelled": True}
    task = {"id": 1, "data": {"file_name": "x.png"}, "annotations": [newer, older, withdrawn]}
    (image,) = review_of_tasks([task], CLASSES, "tasks").images
    assert image.labels.tolist() == [1]


def test_a_drawn_brush_is_every_pixel_with_alpha():
    """Label Studio's canvas stores a brush as coloured RGBA, soft-edged: like its own COCO
    export, any pixel with alpha is in the mask."""
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[1, 1:3] = (255, 0, 0, 255)
    rgba[2, 1] = (255, 0, 0, 40)  # an anti-aliased edge
    region = brush_region("drawn", np.zeros((3, 4), bool), ["cat"])
    region["value"]["rle"] = brush.encode_rle(rgba.ravel())
    task = {"id": 1, "data": {"file_name": "x.png"}, "annotations": [{"result": [region]}]}
    (image,) = review_of_tasks([task], CLASSES, "tasks").images
    np.testing.assert_array_equal(image.masks[0], rgba[..., 3] > 0)
    assert image.masks.sum() == 3


def test_task_file_names():
    def name(**data):
        return task_file_name({"data": data})

    assert name(file_name="a/b.jpg", image="https://x/y/z.jpg") == "a/b.jpg"
    assert name(image="/data/local-files/?d=a/b%20c.jpg") == "a/b c.jpg"
    assert name(image="https://host/set/a%20b.jpg?X-Amz-Signature=1") == "a b.jpg"
    assert name(image="s3://bucket/set/c.png") == "c.png"
    with pytest.raises(KeyError):
        name(image="https://host/")


def test_each_unusable_cvat_image_and_shape_is_one_line(tmp_path):
    images_root = tmp_path / "images"
    save_images(images_root, {"a.png": (6, 4), "small.png": (5, 4)})
    path = tmp_path / "annotations.xml"
    path.write_text(
        """<annotations><version>1.1</version>
        <image id="0" name="a.png" width="6" height="4">
          <box label="cat" xtl="0" ytl="0" xbr="2" ybr="2"/>
          <mask label="dog" rle="1, 2, 1" left="1" top="1" width="2" height="2"/>
          <mask label="horse" rle="0, 4" left="0" top="0" width="2" height="2"/>
          <mask label="cat" rle="1, 9" left="0" top="0" width="2" height="2"/>
          <mask label="cat" rle="4" left="0" top="0" width="2" height="2"/>
          <polygon label="cat" points="0,0;3,3"/>
          <tag label="cat"/>
        </image>
        <image id="1" name="small.png" width="6" height="4"/>
        <image id="2" name="gone.png" width="6" height="4"/>
        <image id="3" name="unsized.png"/>
        </annotations>"""
    )
    review = read_review(str(path), CLASSES, images_root)
    assert review.skipped == (
        "image a.png shape 1 (box 'cat'): only mask and polygon shapes are read, skipped",
        "image a.png shape 3 (mask 'horse'): label 'horse' is not one of the classes "
        "(cat, dog, traffic light), skipped",
        "image a.png shape 4 (mask 'cat'): malformed mask (encoded bitmap does not match "
        "encoded bounding box), skipped",
        "image a.png shape 5 (mask 'cat'): empty mask, skipped",
        "image a.png shape 6 (polygon 'cat'): a polygon of 2 points, at least 3 are needed, "
        "skipped",
        "image a.png shape 7 (tag 'cat'): only mask and polygon shapes are read, skipped",
        "image unsized.png: no width and height, skipped",
        f"small.png: {images_root / 'small.png'} is 5 x 4 but its masks are 6 x 4, skipped",
        f"gone.png: not in {images_root}, skipped",
    )
    (image,) = review.images
    assert image.labels.tolist() == [1]
    expected = np.zeros((4, 6), bool)
    expected[1, 2] = expected[2, 1] = True
    np.testing.assert_array_equal(image.masks[0], expected)


def test_sizes_on_disk_are_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 4 wide and 6 high
    Image.new("RGB", (6, 4)).save(tmp_path / "turned.jpg", exif=exif)
    task = {"id": 1, "data": {"file_name": "turned.jpg"}, "annotations": [{"result": []}]}
    write_export(tmp_path, [task])
    (image,) = read_review(str(tmp_path / "export.json"), CLASSES, tmp_path).images
    assert (image.height, image.width) == (6, 4)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("broken.json", "[{", "broken.json is not JSON (Expecting property name"),
        ("min.json", '{"image": "a.jpg"}', "min.json is not a list of tasks; export the project"),
        ("broken.xml", "<annotations><image>", "broken.xml is not well-formed XML (no element"),
        ("voc.xml", "<annotation/>", "voc.xml has <annotation> where <annotations> should be"),
    ],
)
def test_a_file_that_cannot_be_read_names_itself(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ReviewError, match="^" + re.escape(str(tmp_path / message))):
        read_review(str(tmp_path / name), CLASSES, None)


def test_sources_that_are_not_reviews_say_what_is_read(tmp_path, monkeypatch):
    with pytest.raises(ReviewError, match=r"^a\.zip is not a review usam reads; it reads a"):
        read_review("a.zip", CLASSES, None)
    missing = re.escape(f"{tmp_path / 'gone.json'} does not exist; give the file")
    with pytest.raises(ReviewError, match="^" + missing):
        read_review(str(tmp_path / "gone.json"), CLASSES, None)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(ReviewError, match=r"needs LABEL_STUDIO_API_KEY set; check that"):
        read_review("http://127.0.0.1:1/projects/3", CLASSES, None)


def test_an_unreachable_label_studio_is_one_line(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/projects/3/data?tab=1"
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "a-token")
    with pytest.raises(ReviewError) as raised:
        read_review(url, CLASSES, None)
    assert str(raised.value) == (
        f"cannot reach {url} ([Errno 111] Connection refused); check that Label Studio serves "
        f"http://127.0.0.1:{port} and LABEL_STUDIO_API_KEY holds a personal access token of it "
        "(Account & Settings), or a legacy token where they are enabled"
    )


def test_an_expired_personal_access_token_is_one_line(monkeypatch):
    """The Label Studio SDK refuses it before it asks the server (none is listening here)."""
    expired = jwt.encode({"token_type": "refresh", "exp": 1}, "k" * 32, algorithm="HS256")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", expired)
    with pytest.raises(ReviewError) as raised:
        read_review("http://127.0.0.1:1/projects/3", CLASSES, None)
    assert str(raised.value) == (
        "http://127.0.0.1:1/projects/3: HTTP 401 (API key has expired. Please obtain a "
        "new refresh token.); check that Label Studio serves http://127.0.0.1:1 and "
        "LABEL_STUDIO_API_KEY holds a personal access token of it (Account & Settings), or a "
        "legacy token where they are enabled"
    )
