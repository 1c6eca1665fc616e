"""One label per pixel from overlapping scored instances: what annotate writes, mIoU scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from usam.core.labels import MAX_CLASSES, label_dtype


def semantic_from_instances(
    masks: np.ndarray, labels: Sequence[int], scores: Sequence[float], shape: tuple[int, int]
) -> np.ndarray:
    """Semantic map (0 background, ``label + 1``) from scored instance masks.

    Each pixel takes the label of the highest-scoring mask covering it; on equal
    scores the mask that comes first in the input wins, so the result never
    depends on sort stability. Pixels no mask covers are background. The map is uint8
    while every label fits VOC's layout and uint16 beyond (:mod:`usam.core.labels`);
    exports pick their file format from the vocabulary, not from one image's labels.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.size == 0:
        masks = masks.reshape(0, *shape)
    if masks.ndim != 3 or masks.shape[1:] != tuple(shape):
        raise ValueError(f"masks have shape {masks.shape}; expected (N, {shape[0]}, {shape[1]})")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(masks) == len(labels) == len(scores):
        raise ValueError(f"{len(masks)} masks, {len(labels)} labels and {len(scores)} scores")
    if labels.size and (labels.min() < 0 or labels.max() >= MAX_CLASSES):
        raise ValueError(f"labels must lie in 0..{MAX_CLASSES - 1}, got {np.unique(labels)}")
    semantic = np.zeros(shape, dtype=label_dtype(int(labels.max(initial=-1)) + 1))
    # Paint from lowest to highest priority so the winner is painted last.
    order = np.lexsort((np.arange(len(scores)), -scores))  # best first, input order on ties
    for index in order[::-1]:
        semantic[masks[index]] = labels[index] + 1
    return semantic
