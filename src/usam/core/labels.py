"""Label values shared by readers, metrics and exports, so they cannot disagree.

A label map holds 0 for background, ``i + 1`` for class ``i`` and its dtype's top value
for ignore. Up to :data:`UINT8_CLASSES` classes it is ``uint8`` with 255 = ignore, VOC's
own layout (its files, palette PNGs, every VOC / COCO / ADE20K score unchanged); a larger
vocabulary (LVIS's 1,203 classes, ADE20K-full) gets ``uint16`` with 65535 = ignore.
Ground-truth files on disk keep VOC's 255 = ignore (65535 in 16-bit files); readers
convert it with :func:`ignore_from_disk`.
"""

from __future__ import annotations

import numpy as np

IGNORE = 255  # void / border pixels in a uint8 label map and in VOC-style files on disk
UINT8_CLASSES = 254  # class i is stored as i + 1, so 254 classes leave 255 for ignore
MAX_CLASSES = int(np.iinfo(np.uint16).max) - 1  # uint16 maps: 65535 is ignore
BACKGROUND = "background"  # the head's extra class: pixels and masks that are no named class


def label_dtype(num_classes: int) -> np.dtype:
    """The dtype of label maps of a vocabulary: uint8 while it fits, uint16 beyond."""
    if not 0 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"{num_classes} classes; label maps hold 0..{MAX_CLASSES}")
    return np.dtype(np.uint8 if num_classes <= UINT8_CLASSES else np.uint16)


def ignore_value(dtype: np.dtype | type) -> int:
    """The ignore label of a map of this dtype: 65535 in uint16 maps, 255 otherwise, so
    that maps built before uint16 (and VOC-style arrays of any integer type) keep 255."""
    return int(np.iinfo(np.uint16).max) if np.dtype(dtype) == np.uint16 else IGNORE


def ignore_from_disk(values: np.ndarray, num_classes: int) -> np.ndarray:
    """A label map read from a file in the layout of ``num_classes``: 8-bit files mark
    ignore with 255 (VOC's protocol), 16-bit ones with 65535; either becomes the ignore
    value of the map's dtype."""
    values = np.asarray(values)
    dtype = label_dtype(num_classes)
    converted = values.astype(dtype)
    converted[values == ignore_value(values.dtype)] = ignore_value(dtype)
    return converted
