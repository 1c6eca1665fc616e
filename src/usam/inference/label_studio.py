"""Label Studio pre-annotations: a tasks file it imports as is, and the labelling config.

One task per image, least certain first, each with one prediction (``model_version``
names the head and the SAM; ``score`` is the image's certainty, 1 - uncertainty, so
Label Studio's prediction-score column sorts it the same way). Every kept mask is one
``brushlabels`` region in Label Studio's own RLE, encoded by the Label Studio SDK's brush
codec (``label_studio_sdk.converter.brush``, the one Label Studio decodes with) from a
0/255 mask, since a 0/1 one imports invisible; ``polygons=true`` adds one
``polygonlabels`` outline (percent coordinates) per connected part.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from label_studio_sdk.converter import brush

from usam.formats.storage import atomic_write_text
from usam.inference.exports import ExportError, LabelledImage, class_colour
from usam.inference.polygons import part_polygons
from usam.inference.predictor import Prediction

TASKS_NAME = "tasks.json"
CONFIG_NAME = "config.xml"
LOCAL_FILES = "/data/local-files/?d="


@dataclass(frozen=True)
class LabelStudioSettings:
    document_root: str | None = None  # the folder Label Studio serves local files from
    url_prefix: str | None = None  # where the images folder is online: https://... or s3://...
    polygons: bool = False  # also one editable outline per connected part of each mask

    def check(self) -> None:
        if self.document_root and self.url_prefix:
            raise ExportError("set label_studio.document_root or label_studio.url_prefix, not both")


class ImageAddresses:
    """Where Label Studio loads each image from; checked when made, before any work."""

    def __init__(self, settings: LabelStudioSettings, images_root: Path) -> None:
        self.images_root = images_root.resolve()
        self.prefix = settings.url_prefix.rstrip("/") if settings.url_prefix else None
        self.document_root = None
        if self.prefix:
            return
        if not settings.document_root:
            raise ExportError(
                "export=label_studio needs label_studio.document_root=DIR (the folder Label "
                "Studio serves, its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) or "
                "label_studio.url_prefix=URL (the images folder online: https://... or s3://...)"
            )
        self.document_root = Path(settings.document_root).expanduser().resolve()
        if not self.images_root.is_relative_to(self.document_root):
            raise ExportError(
                f"label_studio.document_root={settings.document_root} does not contain the "
                f"images in {self.images_root}; set it to that folder or one above it, and "
                "serve the same folder as Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
            )

    def __call__(self, file_name: str) -> str:
        if self.prefix:
            return f"{self.prefix}/{quote(file_name)}"
        path = (self.images_root / file_name).relative_to(self.document_root)
        return LOCAL_FILES + quote(path.as_posix())


def label_config(classes: Sequence[str], polygons: bool) -> str:
    """The ``<View>`` of a project for these classes, coloured as the semantic PNGs."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name="image", value="$image", zoom="true")
    tools = [("BrushLabels", "mask")] + ([("PolygonLabels", "outline")] if polygons else [])
    for tag, name in tools:
        labels = ET.SubElement(view, tag, name=name, toName="image")
        for label, class_name in enumerate(classes):
            ET.SubElement(labels, "Label", value=class_name, background=class_colour(label))
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def prediction_regions(
    prediction: Prediction, classes: Sequence[str], polygons: bool
) -> list[dict]:
    """One brush region per instance, then its outlines when asked for."""
    size = {
        "original_width": prediction.width,
        "original_height": prediction.height,
        "image_rotation": 0,
    }
    scale = np.array([prediction.width, prediction.height], dtype=np.float64) / 100
    regions: list[dict[str, Any]] = []
    for index, (label, score, mask) in enumerate(
        zip(prediction.labels, prediction.scores, prediction.masks())
    ):
        name, score = classes[label], float(score)
        rle = brush.mask2rle(mask.astype(np.uint8) * 255)
        value = {"format": "rle", "rle": rle, "brushlabels": [name]}
        regions.append(
            {"id": f"m{index}", "from_name": "mask", "to_name": "image", "type": "brushlabels"}
            | size
            | {"score": score, "value": value}
        )
        for part, polygon in enumerate(part_polygons(mask) if polygons else []):
            value = {"points": (polygon / scale).tolist(), "closed": True, "polygonlabels": [name]}
            regions.append(
                {"id": f"m{index}p{part}", "from_name": "outline", "to_name": "image"}
                | {"type": "polygonlabels"}
                | size
                | {"score": score, "value": value}
            )
    return regions


def model_version(head: str, sam_model_type: str, random_weights: bool) -> str:
    """What a prediction's ``model_version`` says: the head, the SAM, and that the regions
    are no labels when either has random weights (the same words in the tasks file and
    from the ML backend)."""
    version = f"usam {head} + SAM {sam_model_type}"
    return version + (" (random weights: not labels)" if random_weights else "")


def label_studio_tasks(
    ordered: Sequence[LabelledImage],
    classes: Sequence[str],
    addresses: ImageAddresses,
    model_version: str,
    polygons: bool,
) -> list[dict[str, Any]]:
    """Tasks in the given (review) order; ``data`` carries the rank and uncertainty too, so
    they are columns to sort and filter by."""
    tasks = []
    for rank, image in enumerate(ordered, start=1):
        uncertainty = image.prediction.uncertainty()
        data = {
            "image": addresses(image.file_name),
            "file_name": image.file_name,
            "review_rank": rank,
            "uncertainty": uncertainty,
        }
        prediction = {
            "model_version": model_version,
            "score": 1.0 - uncertainty,
            "result": prediction_regions(image.prediction, classes, polygons),
        }
        tasks.append({"data": data, "predictions": [prediction]})
    return tasks


def write_label_studio(
    folder: Path,
    ordered: Sequence[LabelledImage],
    classes: Sequence[str],
    addresses: ImageAddresses,
    model_version: str,
    polygons: bool,
) -> None:
    """``tasks.json`` and ``config.xml`` in ``folder``, each replaced whole."""
    tasks = label_studio_tasks(ordered, classes, addresses, model_version, polygons)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / CONFIG_NAME, label_config(classes, polygons))
    atomic_write_text(folder / TASKS_NAME, json.dumps(tasks))
