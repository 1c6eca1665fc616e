"""CVAT pre-annotations: "CVAT for images 1.1" XML whose masks CVAT imports as mask shapes.

Each kept mask is one ``<mask>`` in CVAT's own RLE over its tight box (encoded by
``cvat_sdk.masks``, the encoding CVAT's REST API and its XML share), labelled with its
class and carrying its score as an attribute. CVAT matches images to task frames by
name, so names are the paths relative to the folder annotated; frame ids follow the
review order (least certain first), which ``frames.txt`` lists for a task created with
CVAT's predefined sorting. ``labels.json`` is the label set for the task's Raw editor.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cvat_sdk.masks import encode_mask

from usam.formats.storage import atomic_write_text
from usam.inference.exports import LabelledImage, class_colour

ANNOTATIONS_NAME = "annotations.xml"
LABELS_NAME = "labels.json"
FRAMES_NAME = "frames.txt"
SCORE_ATTRIBUTE = {
    "name": "score",
    "mutable": False,
    "input_type": "text",
    "default_value": "",
    "values": [""],
}


def cvat_labels(classes: Sequence[str]) -> list[dict[str, Any]]:
    """The task's labels, coloured as the semantic PNGs, each with the score attribute."""
    return [
        {
            "name": name,
            "color": class_colour(label),
            "type": "mask",
            "attributes": [SCORE_ATTRIBUTE],
        }
        for label, name in enumerate(classes)
    ]


def _meta(root: ET.Element, classes: Sequence[str], size: int) -> None:
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "size").text = str(size)
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    for spec in cvat_labels(classes):
        label = ET.SubElement(labels, "label")
        for key in ("name", "color", "type"):
            ET.SubElement(label, key).text = spec[key]
        attribute = ET.SubElement(ET.SubElement(label, "attributes"), "attribute")
        ET.SubElement(attribute, "name").text = SCORE_ATTRIBUTE["name"]
        ET.SubElement(attribute, "mutable").text = "False"
        ET.SubElement(attribute, "input_type").text = SCORE_ATTRIBUTE["input_type"]
        ET.SubElement(attribute, "default_value")
        ET.SubElement(attribute, "values")


def cvat_annotations(ordered: Sequence[LabelledImage], classes: Sequence[str]) -> str:
    """The XML document; the best-scoring mask of an image is drawn on top."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    _meta(root, classes, len(ordered))
    for frame, image in enumerate(ordered):
        prediction = image.prediction
        element = ET.SubElement(
            root,
            "image",
            id=str(frame),
            name=image.file_name,
            width=str(prediction.width),
            height=str(prediction.height),
        )
        count = len(prediction.labels)
        for index, (label, score, mask) in enumerate(
            zip(prediction.labels, prediction.scores, prediction.masks())
        ):
            *counts, left, top, right, bottom = encode_mask(mask)
            shape = ET.SubElement(
                element,
                "mask",
                label=classes[label],
                source="auto",
                occluded="0",
                rle=", ".join(str(int(run)) for run in counts),
                left=str(left),
                top=str(top),
                width=str(right - left + 1),
                height=str(bottom - top + 1),
                z_order=str(count - index),
            )
            ET.SubElement(shape, "attribute", name="score").text = f"{float(score):.4f}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")


def write_cvat(folder: Path, ordered: Sequence[LabelledImage], classes: Sequence[str]) -> None:
    """``annotations.xml``, ``labels.json`` and ``frames.txt`` in ``folder``, each replaced
    whole."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / LABELS_NAME, json.dumps(cvat_labels(classes), indent=2))
    atomic_write_text(folder / FRAMES_NAME, "".join(f"{i.file_name}\n" for i in ordered))
    atomic_write_text(folder / ANNOTATIONS_NAME, cvat_annotations(ordered, classes) + "\n")
