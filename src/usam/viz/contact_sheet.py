"""Contact sheets: one PNG grid per class, because people want to see what was made.

Sheets are written into ``contact_sheets/`` inside the image set and logged to
W&B when a run is active in this process (nothing is imported or started
otherwise).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from usam.formats.image_shards import iter_images, read_image_manifest, slug

SHEET_DIR = "contact_sheets"
_CAPTION_HEIGHT = 14


def make_sheet(images: Iterable[Image.Image], title: str, thumb: int = 128) -> Image.Image:
    """A square-ish grid of thumbnails (scaled up or down to fit) under a one-line caption."""
    images = list(images)
    columns = max(1, math.ceil(math.sqrt(len(images))))
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * thumb, rows * thumb + _CAPTION_HEIGHT), "white")
    ImageDraw.Draw(sheet).text((2, 1), title, fill="black")
    for position, image in enumerate(images):
        tile = ImageOps.contain(image, (thumb, thumb))
        x = (position % columns) * thumb + (thumb - tile.width) // 2
        y = (position // columns) * thumb + _CAPTION_HEIGHT + (thumb - tile.height) // 2
        sheet.paste(tile, (x, y))
    return sheet


def write_contact_sheets(
    directory: str | Path, *, max_per_class: int = 64, thumb: int = 128
) -> list[Path]:
    """One sheet per class of a finished image set (the first images of each class)."""
    directory = Path(directory)
    manifest = read_image_manifest(directory)
    picked: dict[str, list[Image.Image]] = {name: [] for name in manifest.classes}
    for _, image, meta in iter_images(directory):
        chosen = picked[meta["class_name"]]
        if len(chosen) < max_per_class:
            chosen.append(ImageOps.contain(image, (thumb, thumb)))
        if all(len(images) >= max_per_class for images in picked.values()):
            break  # no need to decode the rest of the set
    out_dir = directory / SHEET_DIR
    out_dir.mkdir(exist_ok=True)
    written = []
    for index, name in enumerate(manifest.classes):
        total = manifest.per_class.get(name, 0)
        title = f"{name}: {len(picked[name])} of {total} images ({manifest.source})"
        if manifest.random_weights:
            title += ", random weights"
        path = out_dir / f"{index:03d}-{slug(name)}.png"
        make_sheet(picked[name], title, thumb).save(path)
        written.append(path)
    _log_to_wandb(manifest.classes, written)
    return written


def _log_to_wandb(classes: list[str], paths: list[Path]) -> None:
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    images = {
        f"contact_sheet/{name}": wandb.Image(str(path))
        for name, path in zip(classes, paths, strict=True)
    }
    wandb.log(images)
