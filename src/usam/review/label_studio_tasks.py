"""Label Studio tasks with their annotations (an export, or read from a server) as a Review.

Each task's latest submitted annotation is read. Only ``brushlabels`` and ``polygonlabels``
regions are: the tools usam's labelling config offers (rectangles, keypoints and the rest
get a line each). A brush is decoded by the Label Studio SDK's codec, the one Label Studio
writes with, and a pixel is in it where its alpha is not 0, as Label Studio's own COCO
export reads it. Polygons are in percent of the image and fill as COCO fills polygons.

usam's outlines ``m{i}p{k}`` belong to its brush region ``m{i}``: while that brush is
there they are the same object, and once a reviewer deleted it the outlines of each
class together are the object. Regions a reviewer drew are objects of their own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from label_studio_sdk.converter import brush

from usam.review.regions import UnusableRegion, class_index, polygon_mask, with_pixels
from usam.review.reviewed import Review, ReviewedImage

BRUSH, POLYGON = "brushlabels", "polygonlabels"
OUTLINE_ID = re.compile(r"(m\d+)p\d+")


def task_file_name(task: Mapping) -> str:
    """The image's path relative to the folder annotated: ``data.file_name`` as usam's
    tasks carry it, else the local file (``/data/local-files/?d=a/b.jpg`` is ``a/b.jpg``)
    or the last part of the URL in ``data.image``. KeyError when the task has neither."""
    data = task["data"]
    if data.get("file_name"):
        return data["file_name"]
    address = urlsplit(data["image"])
    local = parse_qs(address.query).get("d")
    name = local[0] if local else unquote(PurePosixPath(address.path).name)
    if not name:
        raise KeyError("image")
    return name


def review_of_tasks(
    tasks: Sequence[Mapping],
    classes: Sequence[str],
    source: str,
    image_name: Callable[[Mapping], str] = task_file_name,
) -> Review:
    """The reviewed images of ``tasks``; a task without a submitted annotation, or a second
    task of the same image, is one line in ``skipped``."""
    classes = tuple(classes)
    images, skipped, first_task = [], [], {}
    for position, task in enumerate(tasks, start=1):
        name = f"task {task.get('id', f'#{position}')}"
        try:
            file_name = image_name(task)
        except (KeyError, TypeError, ValueError):
            skipped.append(f"{name}: no data.file_name or data.image names its image, skipped")
            continue
        where = f"{name} ({file_name})"
        annotation = _latest_submitted(task.get("annotations") or [])
        if annotation is None:
            cancelled = sum(bool(a.get("was_cancelled")) for a in task.get("annotations") or [])
            reason = f" ({cancelled} cancelled)" if cancelled else ""
            skipped.append(f"{where}: no submitted annotation{reason}, skipped")
        elif file_name in first_task:
            skipped.append(f"{where}: the same image as {first_task[file_name]}, skipped")
        else:
            first_task[file_name] = name
            regions = annotation.get("result") or []
            images.append(_reviewed_image(file_name, regions, classes, where, skipped))
    return Review(source, classes, tuple(images), tuple(skipped))


def _latest_submitted(annotations: Sequence[Mapping]) -> Mapping | None:
    submitted = [
        (annotation.get("updated_at") or "", position, annotation)
        for position, annotation in enumerate(annotations)
        if not annotation.get("was_cancelled")
    ]
    return max(submitted, key=lambda entry: entry[:2])[2] if submitted else None


def _reviewed_image(
    file_name: str, regions: Sequence[Mapping], classes: tuple[str, ...], where: str, skipped: list
) -> ReviewedImage:
    """The objects of one annotation. Its size is the first one a region states; with no
    region there is none to state, and the image is 0 x 0 (no objects, every proposal
    background) until ``read_review`` reads the size from the image itself.
    """
    height, width = next(filter(None, map(_stated_size, regions)), (0, 0))
    read = []  # (position, region id, type, label, mask) of every usable region
    for position, region in enumerate(regions, start=1):
        region_id = str(region.get("id", f"#{position}"))
        try:
            label, mask = _region(region, classes, height, width)
        except UnusableRegion as reason:
            skipped.append(f"{where} region {region_id}: {reason}, skipped")
            continue
        read.append((position, region_id, region["type"], label, mask))
    brushes = {region_id for _, region_id, kind, _, _ in read if kind == BRUSH}
    objects: dict[object, tuple[int, np.ndarray]] = {}  # key: position, or outlined brush id
    for position, region_id, kind, label, mask in read:
        outline_of = OUTLINE_ID.fullmatch(region_id) if kind == POLYGON else None
        if outline_of is None:
            objects[position] = (label, mask)
        elif outline_of[1] not in brushes:
            key = (outline_of[1], label)
            objects[key] = (label, objects[key][1] | mask if key in objects else mask)
    labels = np.array([label for label, _ in objects.values()], dtype=np.int64)
    masks = [mask for _, mask in objects.values()]
    masks = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
    return ReviewedImage(file_name, height, width, masks, labels)


def _stated_size(region: Mapping) -> tuple[int, int] | None:
    height, width = region.get("original_height"), region.get("original_width")
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        return height, width
    return None


def _region(
    region: Mapping, classes: tuple[str, ...], height: int, width: int
) -> tuple[int, np.ndarray]:
    kind, value = region.get("type"), region.get("value") or {}
    if kind not in (BRUSH, POLYGON):
        raise UnusableRegion(f"{kind} regions are not read (only {BRUSH} and {POLYGON})")
    label = class_index(value.get(kind) or [], classes)
    size = _stated_size(region)
    if size is None:
        raise UnusableRegion("no original_width and original_height")
    if size != (height, width):
        raise UnusableRegion(
            f"its image is {size[1]} x {size[0]}, the task's other regions' {width} x {height}"
        )
    if kind == BRUSH:
        return label, with_pixels(_brush_mask(value.get("rle"), height, width))
    percent = (width / 100, height / 100)
    return label, with_pixels(polygon_mask(value.get("points"), height, width, percent))


def _brush_mask(rle: object, height: int, width: int) -> np.ndarray:
    """The alpha channel of the RGBA image a brush RLE holds, checked to be this size."""
    try:
        data = bytes(rle)
    except (TypeError, ValueError) as error:
        raise UnusableRegion("malformed RLE (not a list of bytes)") from error
    values = int.from_bytes(data[:4], "big")
    if len(data) < 4 or values != 4 * height * width:
        raise UnusableRegion(
            f"malformed RLE (it holds {values} values, not 4 x {height} x {width})"
        )
    try:
        rgba = brush.decode_rle(data)
    except (ValueError, IndexError, OverflowError) as error:
        raise UnusableRegion("malformed RLE (its runs do not decode)") from error
    return rgba.reshape(height, width, 4)[..., 3] > 0
