"""``benchmarks/review_loop.py``: one turn of the review loop (simulated reviews, fine-tune,
scores of the other images before and after) makes a clear gain where the classes are
learnable, and runs on VOC-mini's photos and ground truth where they are present."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from usam.data.ground_truth import connected_components

from helpers.commands import ROOT, SHARED_DATA, run_python

BENCHMARK = ROOT / "benchmarks" / "review_loop.py"
COLUMNS = (
    "set reviewed regions matched scored miou_before miou_after map50_before map50_after"
).split()


def printed_rows(stdout: str) -> dict[str, dict[str, str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:]]
        if len(cells) == len(COLUMNS) + 1 and cells[0] in ("synthetic", "voc"):
            rows[cells[0]] = dict(zip(COLUMNS, cells)) | {"note": cells[-1]}
    return rows


def test_reviews_of_learnable_classes_raise_both_scores_clearly():
    """Measured at these settings: mIoU 11.77 -> 99.37, mAP50 0.0000 -> 0.9762; each
    reviewed class box is one region, matched by its own proposal (IoU 1) and at times by
    a background box overlapping it at >= 0.5."""
    result = run_python(str(BENCHMARK))
    assert result.returncode == 0, result.stderr[-3000:]
    row = printed_rows(result.stdout)["synthetic"]
    assert (row["reviewed"], row["scored"]) == ("20", "30")  # 5 classes x 10 images
    assert int(row["matched"]) >= int(row["regions"]) > 0
    assert float(row["miou_after"]) >= float(row["miou_before"]) + 50
    assert float(row["map50_after"]) >= float(row["map50_before"]) + 0.5
    assert "synthetic embeddings" in row["note"]


def _voc_regions(chosen: list[str]) -> int:
    """Connected components of each class in the chosen images' masks, as the reviewer
    draws them."""
    masks = SHARED_DATA / "voc2012-mini" / "SegmentationClass"
    regions = 0
    for image_id in chosen:
        semantic = np.asarray(Image.open(masks / f"{image_id}.png"))
        for value in np.unique(semantic):
            if 0 < value < 255:
                regions += len(connected_components(semantic == value))
    return regions


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not on this machine")
def test_the_loop_runs_on_voc_photos_and_says_random_weights():
    voc = SHARED_DATA / "voc2012-mini"
    result = run_python(str(BENCHMARK), "--voc", str(voc))
    assert result.returncode == 0, result.stderr[-3000:]
    row = printed_rows(result.stdout)["voc"]
    ids = sorted((voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split())
    chosen = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))[:20]]
    assert (row["reviewed"], row["scored"]) == ("20", str(len(ids) - 20))
    assert int(row["regions"]) == _voc_regions(chosen)
    assert "RANDOM WEIGHTS" in row["note"] and "untrained SAM (tiny)" in row["note"]
