"""A real Label Studio on the loopback address imports the exported tasks: the regions and
every mask read back through its API (with its SDK) equal what was exported.

Skipped unless a ``label-studio`` executable is on PATH: the server (Django and its
pins) lives in an environment of its own (``pip install label-studio``), while the SDK side
(helpers/label_studio_client.py) runs in this one, where the ``review`` extra installs the
Label Studio SDK beside usam.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from usam.inference.exports import LabelledImage
from usam.inference.label_studio import ImageAddresses, LabelStudioSettings, write_label_studio
from usam.inference.review import review_order

from helpers.label_studio_server import TOKEN, label_studio, needs_label_studio
from helpers.review_exports import prediction_of

CLIENT = Path(__file__).parent / "helpers" / "label_studio_client.py"
CLASSES = ("cat", "dog", "car")
pytestmark = [pytest.mark.integration, needs_label_studio]


def exported_images(photos: Path) -> list[LabelledImage]:
    """Three images: parts, a hole, the border and the whole frame; one with nothing kept."""
    photos.mkdir()
    masks = np.zeros((4, 40, 56), bool)
    masks[0, 5:20, 3:30] = True
    masks[0, 9:14, 10:18] = False  # a hole
    masks[1, 25:40, 40:56] = True  # the bottom-right corner
    masks[1, 0:3, 0:5] = True  # a second part
    masks[2] = True  # the whole frame
    masks[3, 30, 7] = True  # one pixel
    whole = prediction_of(masks, [0, 1, 2, 0], key="street")
    small = np.zeros((1, 30, 30), bool)
    small[0, 10:20, 5:25] = True
    images = [
        LabelledImage("street.png", whole),
        LabelledImage("nested/small.png", prediction_of(small, [1], key="small")),
        LabelledImage("empty.png", prediction_of(np.zeros((0, 24, 32), bool), [], key="empty")),
    ]
    for image in images:
        path = photos / image.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (image.prediction.width, image.prediction.height), "gray").save(path)
    return images


def test_label_studio_imports_the_predictions_mask_for_mask(tmp_path):
    with label_studio(tmp_path) as server:
        url, root = server.url, server.document_root
        ordered = review_order(exported_images(root / "photos"))
        settings = LabelStudioSettings(document_root=str(root), polygons=True)
        addresses = ImageAddresses(settings, root / "photos")
        export = tmp_path / "export"
        write_label_studio(export, ordered, CLASSES, addresses, "usam test + SAM tiny", True)
        read = tmp_path / "read"
        read.mkdir()
        subprocess.run(
            [sys.executable, str(CLIENT), url, TOKEN, str(export), str(root / "photos"), str(read)],
            check=True,
            timeout=300,
        )
        tasks = json.loads((read / "read_back.json").read_text())
        exported = json.loads((export / "tasks.json").read_text())
        assert [t["file_name"] for t in tasks] == [i.file_name for i in ordered]
        for task, sent, image in zip(tasks, exported, ordered):
            assert task["model_version"] == "usam test + SAM tiny"
            assert task["score"] == pytest.approx(1 - image.prediction.uncertainty())
            regions = sent["predictions"][0]["result"]
            assert [(r["type"], r["id"]) for r in task["regions"]] == [
                (r["type"], r["id"]) for r in regions
            ]
            brushes = [r for r in task["regions"] if r["type"] == "brushlabels"]
            assert len(brushes) == len(image.prediction.labels)
            for region, label, mask in zip(
                brushes, image.prediction.labels, image.prediction.masks()
            ):
                assert region["label"] == CLASSES[label]
                np.testing.assert_array_equal(np.load(read / region["npy"]), mask)
            polygons = [r for r in task["regions"] if r["type"] == "polygonlabels"]
            sent_polygons = [r["value"]["points"] for r in regions if r["type"] == "polygonlabels"]
            assert [r["points"] for r in polygons] == sent_polygons
            served = requests.get(
                url + task["image"], headers={"Authorization": f"Token {TOKEN}"}, timeout=30
            )
            assert (
                served.ok and served.content == (root / "photos" / task["file_name"]).read_bytes()
            )
