"""What a person said about an image: the one form every review reader returns.

Label Studio exports, tasks read from a running Label Studio and CVAT XML all become
:class:`ReviewedImage` s, so fine-tuning and the ML backend never see a format. A region
that cannot be used is not guessed at: it is left out with one line in
``Review.skipped`` saying which file, task or image, which region, and why.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from usam.core.errors import UsageError


class ReviewError(UsageError, ValueError):
    """A review file or server that cannot be read at all (not a region that is skipped)."""


@dataclass(frozen=True)
class ReviewedImage:
    """One reviewed image: its regions as full-size masks with their classes."""

    file_name: str  # the image's path relative to the folder annotated, as exports name it
    height: int
    width: int
    masks: np.ndarray  # (R, H, W) bool, one per region
    labels: np.ndarray  # (R,) int64, 0-based indices into the review's classes

    def __post_init__(self) -> None:
        if self.masks.shape != (len(self.labels), self.height, self.width):
            raise ValueError(
                f"{self.file_name}: masks {self.masks.shape} do not match "
                f"{len(self.labels)} labels on a {self.height} x {self.width} image"
            )


@dataclass(frozen=True)
class Review:
    """The usable images of one review, and one line for everything left out."""

    source: str  # the file, or the server and project, it was read from
    classes: tuple[str, ...]
    images: tuple[ReviewedImage, ...]
    skipped: tuple[str, ...] = ()

    @property
    def regions(self) -> int:
        return sum(len(image.labels) for image in self.images)

    def digest(self) -> str:
        """sha256 of what fine-tuning learns from (names, classes, masks), so a head's
        metadata says exactly which review it saw, whatever file it came in."""
        hasher = hashlib.sha256()
        hasher.update("\n".join(self.classes).encode())
        for image in sorted(self.images, key=lambda image: image.file_name):
            hasher.update(f"\n{image.file_name}:{image.height}x{image.width}".encode())
            hasher.update(np.ascontiguousarray(image.labels, dtype=np.int64).tobytes())
            hasher.update(np.packbits(image.masks).tobytes())
        return hasher.hexdigest()

    def identity(self) -> dict[str, str | int]:
        """What a fine-tuned head's metadata and its W&B run record of the review."""
        return {
            "source": self.source,
            "sha256": self.digest(),
            "images": len(self.images),
            "regions": self.regions,
            "skipped": len(self.skipped),
        }
