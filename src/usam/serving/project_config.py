"""What the backend reads of a Label Studio project's labelling config: which image field
the tasks carry, which control tags the regions go to, and which labels the project uses.

Regions are addressed by the project's own tag names (``from_name`` / ``to_name``), so a
project whose ``<BrushLabels>`` is not named ``mask`` still shows them; its labels must be
exactly the head's classes, since a region of a label the project lacks is dropped by
Label Studio and a label the head lacks is never predicted.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from usam.serving.errors import RequestError


@dataclass(frozen=True)
class ControlTag:
    name: str  # the region's from_name
    to_name: str  # the region's to_name: the <Image> it labels
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ProjectConfig:
    image_field: str  # the task data key the <Image> shows ($image -> image)
    brush: ControlTag
    polygon: ControlTag | None

    def addressed(self, regions: list[dict]) -> list[dict]:
        """Regions as ``usam.inference.label_studio`` writes them, sent to this project's tags."""
        tags = {"brushlabels": self.brush, "polygonlabels": self.polygon}
        addressed = []
        for region in regions:
            tag = tags[region["type"]]
            addressed.append(region | {"from_name": tag.name, "to_name": tag.to_name})
        return addressed


def _control(root: ET.Element, tag: str) -> ControlTag | None:
    found = root.find(f".//{tag}")
    if found is None:
        return None
    labels = tuple(label.get("value", "") for label in found.iter("Label"))
    return ControlTag(found.get("name", ""), found.get("toName", ""), labels)


def _check_labels(control: ControlTag, tag: str, classes: Sequence[str]) -> None:
    unknown = [label for label in control.labels if label not in classes]
    missing = [name for name in classes if name not in control.labels]
    if unknown:
        raise RequestError(
            f"the project's <{tag}> has labels the head was not trained on: "
            f"{', '.join(unknown)}; its labels must be the head's classes: {', '.join(classes)}"
        )
    if missing:
        raise RequestError(
            f"the project's <{tag}> lacks the head's classes {', '.join(missing)}; "
            f"add a <Label value=...> for each (the head's classes: {', '.join(classes)})"
        )


def project_config(text: object, classes: Sequence[str], polygons: bool) -> ProjectConfig:
    """The config ``text`` checked against the head's ``classes``; ``polygons``: the backend
    also sends outlines, which need a ``<PolygonLabels>``."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError("the request has no label config (a project's <View> XML)")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        raise RequestError(f"the project's label config is not XML: {error}") from None
    image = root.find(".//Image")
    value = "" if image is None else image.get("value", "")
    if not value.startswith("$"):
        raise RequestError('the project\'s label config has no <Image value="$field">')
    brush = _control(root, "BrushLabels")
    if brush is None:
        raise RequestError(
            "the project's label config has no <BrushLabels>: the backend predicts brush "
            "masks (usam.annotate export=label_studio writes a config that has one)"
        )
    _check_labels(brush, "BrushLabels", classes)
    polygon = _control(root, "PolygonLabels") if polygons else None
    if polygons and polygon is None:
        raise RequestError(
            "polygons=true sends outlines, but the project's label config has no "
            "<PolygonLabels>; add one or start the backend with polygons=false"
        )
    if polygon is not None:
        _check_labels(polygon, "PolygonLabels", classes)
    return ProjectConfig(value[1:], brush, polygon)
