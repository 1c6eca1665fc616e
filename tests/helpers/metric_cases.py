"""Random images with ground truth and detections, as the metric collection takes them.

Light on imports: the two-rank probe loads it in every process.
"""

from __future__ import annotations

import numpy as np

from usam.data.ground_truth import GroundTruth, Instance

METRIC_CLASSES = ("cat", "dog", "car")


def random_images(count: int = 7, seed: int = 0) -> list[dict]:
    """Per image the keywords the metric collection takes: boxes as ground truth (some
    crowds, one image without objects), shifted copies and false alarms as detections."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        height, width = 30 + index, 40
        instances = []
        for _ in range(int(rng.integers(1, 5)) if index != 2 else 0):
            mask = np.zeros((height, width), bool)
            top, left = int(rng.integers(0, height - 10)), int(rng.integers(0, width - 10))
            mask[top : top + 10, left : left + int(rng.integers(4, 10))] = True
            instances.append(Instance(mask, int(rng.integers(3)), bool(rng.random() < 0.1)))
        semantic = np.zeros((height, width), np.uint8)
        for instance in instances:
            semantic[instance.mask] = 255 if instance.iscrowd else instance.label + 1
        detections = [np.roll(i.mask, int(rng.integers(-4, 5)), axis=1) for i in instances]
        labels = [i.label for i in instances]
        for _ in range(2):
            mask = np.zeros((height, width), bool)
            top, left = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
            mask[top : top + 8, left : left + 8] = True
            detections.append(mask)
            labels.append(int(rng.integers(3)))
        images.append(
            {
                "semantic": rng.integers(0, 4, (height, width)).astype(np.uint8),
                "masks": np.array(detections, bool).reshape(-1, height, width),
                "labels": labels,
                "scores": rng.random(len(labels)).tolist(),
                "truth": GroundTruth(semantic, instances),
            }
        )
    return images
