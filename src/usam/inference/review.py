"""Which images need a person most: the order every review export lists its images in.

An image's uncertainty is the mean normalised entropy of the head over its kept
instances (``Prediction.uncertainty``); an image where the head kept nothing counts as
fully uncertain, since a person must then find every object.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from usam.formats.storage import atomic_write_text
from usam.inference.exports import LabelledImage

REVIEW_NAME = "review.csv"


def review_order(images: Sequence[LabelledImage]) -> list[LabelledImage]:
    """Least certain first; equal uncertainties in file-name order, so reruns agree."""
    return sorted(images, key=lambda image: (-image.prediction.uncertainty(), image.file_name))


def write_review_list(ordered: Sequence[LabelledImage], path: Path) -> None:
    """``rank, file_name, uncertainty, instances, lowest_score`` per image, in review order."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["rank", "file_name", "uncertainty", "instances", "lowest_score"])
    for rank, image in enumerate(ordered, start=1):
        scores = image.prediction.scores
        lowest = f"{scores.min():.4f}" if len(scores) else ""
        uncertainty = f"{image.prediction.uncertainty():.4f}"
        writer.writerow([rank, image.file_name, uncertainty, len(scores), lowest])
    atomic_write_text(path, text.getvalue())
