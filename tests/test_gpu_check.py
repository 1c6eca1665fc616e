"""benchmarks/gpu_check.py, the one command a GPU machine runs, as its CPU smoke test: tiny
models, every part of the JSON it writes, the exactness contract holding on the CPU, each
best batch the fastest of the rows printed, and a part past its time bound saying what it
skipped. No speed itself is checked."""

from __future__ import annotations

import json
import re

import pytest
import torch

from usam.testing.agreement import SCORE_RTOL

from helpers.commands import ROOT, run_python

SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")
PARTS = {"contract_fp32", "contract_tf32", "speed_sam1", "speed_sam2", "stable_diffusion"}


def run_check(tmp_path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "gpu_check.json"
    result = run_python(SCRIPT, "--device", "cpu", "--out", str(out), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    return run_check(tmp_path_factory.mktemp("gpu_check"))


@pytest.mark.slow
def test_the_smoke_run_writes_every_part_and_says_its_weights_are_random(smoke):
    report, stdout = smoke
    assert set(report["parts"]) == PARTS
    assert not any("error" in part for part in report["parts"].values())
    assert report["random_weights"] is True and report["meaningful"] is False
    assert report["not_meaningful_because"] == [
        "an untrained SAM (tiny)",
        "an untrained SAM 2.1 (sam2.1_tiny)",
        "an untrained Stable Diffusion",
    ]
    assert "NOT results" in report["note"] and report["note"] in stdout
    machine = report["machine"]
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{40}", machine["usam_commit"])
    assert report["parts"]["contract_tf32"] == {
        "not_applicable": "not applicable: TF32 is a CUDA setting and this run is on the CPU"
    }


def test_the_contract_holds_on_the_cpu(smoke):
    contract = smoke[0]["parts"]["contract_fp32"]
    assert contract["holds"] is True
    assert contract["violations"] == [] and contract["violation_count"] == 0
    assert contract["images_checked"] == 1 and not contract["cut"]
    # one mask per point of the 4 x 4 grid on each side, every one paired
    assert contract["official_masks"] == contract["our_masks"] == contract["paired"] == 16
    assert contract["identical_share"] == contract["identical_masks"] / 16
    assert contract["max_iou_pred_diff"] <= SCORE_RTOL
    assert contract["tf32"].startswith("not applicable")
    assert contract["peak_gpu_mb"].startswith("not applicable")


@pytest.mark.parametrize(("part", "model"), [("speed_sam1", "tiny"), ("speed_sam2", "sam2.1_tiny")])
def test_each_sam_is_timed_at_every_points_per_batch_and_the_best_is_the_fastest(
    smoke, part, model
):
    speed = smoke[0]["parts"][part]
    assert speed["model"] == model and not speed["cut"] and speed["skipped"] == []
    rows = speed["rows"]
    assert [row["points_per_batch"] for row in rows] == [4, 16]
    best = speed["best"]
    for side in ("usam", "official"):
        key = f"{side}_ms_per_image"
        assert all(row[key] > 0 for row in rows)
        fastest = min(rows, key=lambda row: row[key])
        assert best[side] == {"points_per_batch": fastest["points_per_batch"], key: fastest[key]}
    ratio = best["official"]["official_ms_per_image"] / best["usam"]["usam_ms_per_image"]
    assert best["official_over_usam"] == pytest.approx(ratio, rel=1e-12)
    assert speed["settings"]["proposals"] == "one_per_point"


def test_stable_diffusion_is_timed_at_each_batch(smoke):
    generation = smoke[0]["parts"]["stable_diffusion"]
    assert generation["steps"] == 2 and "tiny" in generation["models"]
    rows = generation["rows"]
    assert [(row["batch"], row["calls"]) for row in rows] == [(2, 1), (4, 1)]
    assert all(row["images_per_second"] > 0 for row in rows)
    # the rates are images over the timed calls, which the part's own clock encloses
    assert sum(row["batch"] / row["images_per_second"] for row in rows) < generation["seconds"]


def test_a_part_past_its_bound_records_the_units_it_skipped(tmp_path):
    report, _ = run_check(tmp_path, "--parts", "stable_diffusion", "--time-scale", "0")
    assert set(report["parts"]) == {"stable_diffusion"}
    assert report["not_meaningful_because"] == ["an untrained Stable Diffusion"]
    generation = report["parts"]["stable_diffusion"]
    assert generation["bound_s"] == 0 and generation["cut"] is True
    assert generation["skipped"] == ["batch 2 call 0", "batch 4 call 0"]
    assert [row["images_per_second"] for row in generation["rows"]] == [None, None]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_the_default_run_names_the_smoke_test(tmp_path):
    result = run_python(SCRIPT, "--out", str(tmp_path / "gpu_check.json"))
    assert result.returncode == 2
    assert "torch sees no CUDA device here; --device cpu runs the smoke test" in result.stderr
    assert not (tmp_path / "gpu_check.json").exists()
