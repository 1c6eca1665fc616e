"""The review exports on masks chosen to break encoders (long runs, the first and last pixel,
the whole frame, odd class names), read back with the Label Studio SDK and the CVAT SDK,
and the image addresses Label Studio loads from."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from usam.inference.cvat import write_cvat
from usam.inference.exports import ExportError, LabelledImage, check_exports
from usam.inference.label_studio import (
    ImageAddresses,
    LabelStudioSettings,
    label_config,
    write_label_studio,
)
from usam.inference.review import review_order

from helpers.review_exports import cvat_masks, label_studio_brush_masks, prediction_of

CLASSES = ("traffic light", 'a "quoted" & <odd> name', "dog")


def hard_masks() -> np.ndarray:
    """(6, 310, 300): runs far past Label Studio's 16-bit run field, corners, noise."""
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 310, 300), bool)
    masks[0] = True  # 93 000 pixels in one run
    masks[1, 0, 0] = masks[1, -1, -1] = True  # the first and the last pixel only
    masks[2] = rng.random((310, 300)) < 0.5  # a run change at almost every pixel
    masks[3, 100:310, 0:300] = True  # from a row start to the end
    masks[4, :, 150] = True  # one column
    masks[5, 7:9, 290:300] = True  # against the right edge
    return masks


def test_label_studio_and_cvat_read_back_hard_masks_pixel_for_pixel(tmp_path):
    masks = hard_masks()
    image = LabelledImage("photos/a b.png", prediction_of(masks, [0, 1, 2, 0, 1, 2]))
    addresses = ImageAddresses(LabelStudioSettings(url_prefix="s3://bucket/set/"), tmp_path)
    write_label_studio(tmp_path / "ls", [image], CLASSES, addresses, "usam test", False)
    (task,) = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert task["data"]["image"] == "s3://bucket/set/photos/a%20b.png"
    expected = [(CLASSES[label], mask) for label, mask in zip([0, 1, 2, 0, 1, 2], masks)]
    for got, want in zip(label_studio_brush_masks(task), expected, strict=True):
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])
    write_cvat(tmp_path / "cvat", [image], CLASSES)
    for got, want in zip(
        cvat_masks(tmp_path / "cvat" / "annotations.xml")["photos/a b.png"], expected, strict=True
    ):
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])
    labels = json.loads((tmp_path / "cvat" / "labels.json").read_text())
    assert [label["name"] for label in labels] == list(CLASSES)


def test_the_label_config_names_every_class_verbatim():
    view = ET.fromstring(label_config(CLASSES, polygons=True))
    assert view.find("Image").get("value") == "$image"
    for tool in ("BrushLabels", "PolygonLabels"):
        labels = view.find(tool)
        assert labels.get("toName") == "image"
        assert [label.get("value") for label in labels] == list(CLASSES)
        assert all(label.get("background").startswith("#") for label in labels)
    assert [tool.tag for tool in view] == ["Image", "BrushLabels", "PolygonLabels"]
    brush_only = ET.fromstring(label_config(CLASSES, polygons=False))
    assert [tool.tag for tool in brush_only] == ["Image", "BrushLabels"]


def test_review_order_puts_the_least_certain_first():
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 1:3, 1:3] = True
    sure, unsure = prediction_of(mask, [0], "sure"), prediction_of(mask, [0], "unsure")
    sure.entropies[:], unsure.entropies[:] = 0.05, 0.6
    nothing = prediction_of(np.zeros((0, 4, 4), bool), [], "nothing")
    images = [LabelledImage(f"{p.key}.png", p) for p in (sure, unsure, nothing)]
    assert [i.file_name for i in review_order(images)] == ["nothing.png", "unsure.png", "sure.png"]


def test_local_file_addresses_need_a_document_root_above_the_images(tmp_path):
    photos = tmp_path / "served" / "photos"
    photos.mkdir(parents=True)
    served = ImageAddresses(LabelStudioSettings(document_root=str(tmp_path / "served")), photos)
    assert served("nested/x 1.jpg") == "/data/local-files/?d=photos/nested/x%201.jpg"
    with pytest.raises(ExportError, match="does not contain the images in .*photos"):
        ImageAddresses(LabelStudioSettings(document_root=str(tmp_path / "elsewhere")), photos)
    with pytest.raises(ExportError, match="needs label_studio.document_root=DIR"):
        ImageAddresses(LabelStudioSettings(), photos)
    with pytest.raises(ExportError, match="url_prefix, not both"):
        LabelStudioSettings(document_root="a", url_prefix="b").check()


def test_export_names_are_checked():
    assert check_exports("label_studio") == ("label_studio",)
    assert check_exports(["coco", "cvat"]) == ("coco", "cvat")
    with pytest.raises(ExportError, match="export=labelstudio is not an export; choose from"):
        check_exports(["coco", "labelstudio"])
