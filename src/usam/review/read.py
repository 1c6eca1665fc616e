"""One entry for every review source: a Label Studio export, CVAT XML or a running Label Studio.

With the annotated folder at hand, each reviewed image is checked against its file there,
since a review only names images: one that is not there, or whose size is not the one its
masks were drawn at, is left out with a line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from usam.review.reviewed import Review, ReviewedImage, ReviewError

PROJECT_URL = re.compile(r"(?P<server>https?://[^/?#]+)/projects/(?P<project>\d+)(?:[/?#].*)?")
SOURCES = (
    "a Label Studio JSON export (*.json), CVAT for images 1.1 XML (*.xml) "
    "or a Label Studio project (http(s)://HOST[:PORT]/projects/ID)"
)
API_KEY = "LABEL_STUDIO_API_KEY"
ROTATED = (5, 6, 7, 8)  # EXIF orientations that turn an image on its side


def read_review(source: str, classes: Sequence[str], images_root: Path | None) -> Review:
    """The review at ``source``, checked against ``images_root`` when given."""
    review = _read(source, classes)
    return review if images_root is None else _on_disk(review, images_root)


def _read(source: str, classes: Sequence[str]) -> Review:
    project = PROJECT_URL.fullmatch(source)
    if project:
        _need("label_studio_sdk", source)
        from usam.review.label_studio_tasks import review_of_tasks

        tasks = _server_tasks(source, project["server"], int(project["project"]))
        return review_of_tasks(tasks, classes, source)
    path = Path(source)
    kind = path.suffix.lower()
    if kind not in (".json", ".xml"):
        raise ReviewError(f"{source} is not a review usam reads; it reads {SOURCES}")
    if not path.is_file():
        raise ReviewError(f"{source} does not exist; give the file exported from the tool")
    if kind == ".xml":
        _need("cvat_sdk", source)
        from usam.review.cvat_xml import review_of_cvat

        return review_of_cvat(path, classes)
    _need("label_studio_sdk", source)
    from usam.review.label_studio_tasks import review_of_tasks

    return review_of_tasks(_exported_tasks(path), classes, source)


def _need(package: str, source: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ReviewError(
            f"reading {source} needs the {package} package: pip install 'usam[review]'"
        )


def _exported_tasks(path: Path) -> list[dict]:
    again = "export the project again from Label Studio as JSON"
    try:
        tasks = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReviewError(f"{path} is not JSON ({error}); {again}") from error
    if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
        raise ReviewError(f"{path} is not a list of tasks; {again} (not JSON-MIN or COCO)")
    return tasks


def _server_tasks(source: str, server: str, project: int) -> list[dict]:
    """Every task of the project with its annotations, through the Label Studio SDK, which
    takes a personal access token or a legacy one (and refuses an expired personal one
    before it asks the server)."""
    fix = (
        f"check that Label Studio serves {server} and {API_KEY} holds a personal access "
        "token of it (Account & Settings), or a legacy token where they are enabled"
    )
    token = os.environ.get(API_KEY)
    if not token:
        raise ReviewError(f"reading {source} needs {API_KEY} set; {fix}")
    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    try:
        client = LabelStudio(base_url=server, api_key=token)
        return [task.model_dump() for task in client.tasks.list(project=project)]
    except httpx.HTTPError as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ReviewError(f"cannot reach {source} ({reason}); {fix}") from error
    except ApiError as error:
        detail = error.body.get("detail") if isinstance(error.body, dict) else error.body
        said = " ".join(str(detail).split())
        raise ReviewError(f"{source}: HTTP {error.status_code} ({said}); {fix}") from error


def _on_disk(review: Review, images_root: Path) -> Review:
    """The images found in ``images_root`` at the size of their masks; an image without
    regions (its size unknown) takes its file's."""
    images, skipped = [], list(review.skipped)
    for image in review.images:
        path = images_root / image.file_name
        try:
            width, height = _upright_size(path)
        except FileNotFoundError:
            skipped.append(f"{image.file_name}: not in {images_root}, skipped")
            continue
        except (OSError, UnidentifiedImageError):
            skipped.append(f"{image.file_name}: {path} is not an image Pillow reads, skipped")
            continue
        if (image.height, image.width) == (0, 0):
            image = _sized(image, height, width)
        if (image.height, image.width) != (height, width):
            skipped.append(
                f"{image.file_name}: {path} is {width} x {height} but its masks are "
                f"{image.width} x {image.height}, skipped"
            )
            continue
        images.append(image)
    return replace(review, images=tuple(images), skipped=tuple(skipped))


def _sized(image: ReviewedImage, height: int, width: int) -> ReviewedImage:
    masks = np.zeros((0, height, width), dtype=bool)
    return replace(image, height=height, width=width, masks=masks)


def _upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as usam and the annotation tools show the image: EXIF rotation applied."""
    with Image.open(path) as image:
        width, height = image.size
        rotated = image.getexif().get(ExifTags.Base.Orientation) in ROTATED
    return (height, width) if rotated else (width, height)
