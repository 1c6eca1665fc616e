"""benchmarks/op_counts.py: what it counts as a sync, that usam's GPU settings read the
device a fixed number of times per batch whatever the number of masks, and that the
script prints its table (tiny settings; its counts, not timings, are checked)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import build_engine, build_sam
from usam.testing.agreement import point_ious

from helpers.commands import ROOT, run_python
from helpers.official_amg import shapes_image

SCRIPT = ROOT / "benchmarks" / "op_counts.py"


@pytest.fixture(scope="module")
def op_counts():
    """The script as a module; registered while it runs, as its dataclasses need."""
    spec = importlib.util.spec_from_file_location("op_counts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def counted(op_counts, work):
    return op_counts.count(lambda image: work(), np.zeros(0), torch.device("cpu"))


def test_what_makes_the_host_wait_is_a_sync(op_counts):
    def on_the_device():
        x = torch.arange(6.0, device="cpu")  # named a device: a GPU run's device tensor
        mask = x > 2
        x[mask]  # boolean indexing
        x[mask] = 0.0  # boolean assignment
        int(x[1])  # a value read
        torch.unique(x)
        x.nonzero()
        x.cpu().numpy()  # one copy: the numpy view of the copy is on the host already
        (x + 1).tolist()  # another
        return []

    counts = counted(op_counts, on_the_device)
    assert counts.syncs == {
        "boolean indexing": 2,
        "value read": 1,
        "_unique2": 1,
        "nonzero": 1,
        "host copy": 2,
    }
    assert counts.ops >= 10


def test_work_on_the_host_or_sizes_known_beforehand_is_no_sync(op_counts):
    def without_syncs():
        x = torch.arange(6.0, device="cpu")
        (x * 2).sum(0).argmax()  # device work of a known size
        x.index_select(0, torch.tensor([1, 2], device="cpu"))
        host = torch.zeros(4)  # made without a device: a GPU run makes it on the host
        host[host > 0]
        int(host[0])
        host.tolist()
        from_numpy = torch.as_tensor(np.arange(3))
        (from_numpy + host[:3]).nonzero()
        x.cpu().numpy()  # the one copy
        return []

    counts = counted(op_counts, without_syncs)
    assert counts.syncs == {"host copy": 1}


@pytest.fixture(scope="module")
def tiny():
    return build_sam("tiny")[0]


def test_the_gpu_settings_read_the_device_a_fixed_number_of_times_per_batch(op_counts, tiny):
    """Two IoU thresholds keep very different numbers of masks: usam's syncs stay the same,
    a few per batch, while the official generator's grow with the masks."""
    image = shapes_image(96, 128, 1)
    settings = AmgSettings(
        points_per_side=8,
        points_per_batch=16,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        tuned_for="gpu",
    )
    ious = point_ious(build_engine("tiny", tiny, settings), image)
    runs = {}
    for share in (0.8, 0.2):  # of the masks passing the IoU filter
        threshold = float(np.quantile(ious, 1 - share))
        engine = build_engine("tiny", tiny, replace(settings, pred_iou_thresh=threshold))
        runs[share] = op_counts.count(engine.generate, image, torch.device("cpu"))
        official = engine.official_generator()
        runs[f"official {share}"] = op_counts.count(official, image, torch.device("cpu"))
    batches = 64 // 16
    assert runs[0.8].masks > 3 * runs[0.2].masks > 0
    assert runs[0.8].syncs == runs[0.2].syncs
    assert runs[0.8].total_syncs <= 16 * batches
    for share in (0.8, 0.2):
        official = runs[f"official {share}"]
        assert official.masks == runs[share].masks
        assert official.total_syncs > 2 * official.masks
        assert runs[share].ops < official.ops


def test_the_script_prints_its_table():
    result = run_python(
        str(SCRIPT), *("--model", "tiny", "--grids", "4", "--points-per-batch", "8")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model=tiny random_weights=True device=cpu image=VOC photo 500x375" in result.stdout
    table = result.stdout.split("syncs by kind")[0].splitlines()
    rows = {line[8:36].strip(): line[36:].split() for line in table if line.startswith("  4x4")}
    official, gpu, cpu = (
        rows["official (8 points/batch)"],
        rows["usam gpu settings"],
        rows["usam cpu settings"],
    )
    assert official[0] == gpu[0] == cpu[0] == "48"  # every mask of 4 x 4 points kept
    assert float(official[3]) == 1.0 and float(official[4]) == 1.0
    assert int(gpu[1]) < int(official[1]) and int(gpu[2]) < int(official[2])
    assert float(gpu[3]) == pytest.approx(int(gpu[1]) / int(official[1]), abs=0.01)
    assert "4x4: usam's gpu settings dispatch" in result.stdout
