"""``usam.eval``: extraction on demand and its cache, the files it writes, the random-weights
warning, and end to end on the VOC and COCO128 subsets in ``../shared/data``."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from PIL import Image

from usam.command_errors import user_error_line
from usam.commands.eval import run
from usam.evaluation.reports import sweep_plot
from usam.evaluation.scoring import EvaluationError, ThresholdGrid, evaluate
from usam.formats.embedding_shards import ShardSetError, read_manifest
from usam.inference.predictor import InferenceSettings, Predictor, load_head

from helpers.commands import ROOT, SHARED_DATA, TINY_EVAL, compose_config, run_python
from helpers.evaluation import AMG, head_checkpoint, write_voc
from helpers.wandb_runs import offline_record

SMALL = [
    *TINY_EVAL,
    "inference.confidence_threshold=0.3",
    "sweep.confidence_thresholds=[0.2,0.5]",
    "sweep.nms_ious=[0.3,0.5,0.9]",
    "num_overlays=2",
]


def compose_eval(tmp_path: Path, *overrides: str):
    return compose_config(
        "eval",
        [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", *SMALL, *overrides],
    )


def test_eval_extracts_once_and_writes_its_results(tmp_path, capsys, caplog):
    voc = write_voc(tmp_path / "VOC2012")
    ckpt = head_checkpoint(tmp_path / "head.ckpt")
    data = [f"eval_data.source.root={voc}"]
    assert run(compose_eval(tmp_path, *data)) is None  # ckpt=null: only the shard set
    first = capsys.readouterr().out
    assert "extracting SAM embeddings" in first
    shards = Path(first.split("evaluation shard set ready: ")[1].strip())
    assert shards.name == "eval" and shards.parent.name.startswith("eval-voc_val-tiny-")

    with caplog.at_level(logging.WARNING, logger="usam.core.provenance"):
        summary = run(compose_eval(tmp_path, *data, f"ckpt={ckpt}", "wandb.enabled=true"))
    out = capsys.readouterr().out
    assert "extracting" not in out  # cached by the id of images, SAM and settings
    assert "RANDOM WEIGHTS: these numbers check the evaluation pipeline" in caplog.text
    assert "evaluation masks: an untrained SAM (tiny)" in caplog.text
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    grid = ThresholdGrid(confidence_thresholds=(0.2, 0.5), nms_ious=(0.3, 0.5, 0.9))  # SMALL's
    expected = evaluate(
        shards,
        Predictor.from_checkpoint(ckpt, InferenceSettings(confidence_threshold=0.3)),
        sweep=grid,
    )
    assert {name: metrics[name] for name in expected.headline} == pytest.approx(expected.headline)
    shown = [f"{name} {expected.scores[name]:.4f}" for name in ("mAP50", "mAP50-95")]
    assert "  ".join([f"mIoU {expected.scores['mIoU']:.2f}", *shown]) in out
    assert metrics["images"] == 2 and metrics["meaningful"] is False
    assert metrics["shards"] == str(shards) and metrics["eval_data"] == "voc_val"
    with open(run_dir / "per_class.csv") as handle:
        assert len(list(csv.reader(handle))) == 1 + 21
    with open(run_dir / "sweep.csv") as handle:
        assert len(list(csv.reader(handle))) == 1 + 2 * 3
    with Image.open(run_dir / "sweep.png") as plot:  # the sweep's own numbers, drawn
        assert plot.convert("RGB").tobytes() == sweep_plot(expected.sweep).tobytes()
    assert sorted(p.name for p in (run_dir / "overlays").iterdir()) == [
        "2011_000003.png",
        "2011_000004.png",
    ]
    logged = list((run_dir / "wandb").glob("offline-run-*/files/media/table/eval/*.table.json"))
    assert {p.name.split("_")[0] for p in logged} == {"per", "sweep"}
    # the overlays travel inside the offline run: two panels and two interactive masks
    media = (run_dir / "wandb").glob("offline-run-*/files/media/images/eval/overlays*.png")
    assert len(list(media)) == 4
    per_class = json.loads(next(p for p in logged if p.name.startswith("per")).read_text())
    assert per_class["columns"][-1] == "random_weights"
    assert {row[-1] for row in per_class["data"]} == {True}
    markers = (
        b"eval/iou/background",
        b"eval/ap50/person",
        b"eval/mAP50-95",
        b"inference.confidence_threshold",
        b"random-weights",
    )
    record = offline_record(run_dir / "wandb", *markers)
    for marker in markers:
        assert marker in record, marker  # per-class scalars, the flat config, the tag


def test_eval_makes_masks_the_way_the_head_was_trained(tmp_path):
    voc = write_voc(tmp_path / "VOC2012")
    recorded = dataclasses.asdict(AMG)
    ckpt = head_checkpoint(tmp_path / "head.ckpt", mask_settings=AMG)
    assert load_head(ckpt).metadata.mask_settings == AMG
    no_amg = [o for o in SMALL if not o.startswith("amg.")]  # the config's amg: 32 x 32 points
    shown = run_python(
        "-m",
        "usam.eval",
        f"ckpt={ckpt}",
        f"eval_data.source.root={voc}",
        *no_amg,
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    line = next(x for x in shown.stdout.splitlines() if f"mask settings recorded in {ckpt}:" in x)
    assert "points_per_side=8," in line
    assert "scoring" in shown.stderr and "2/2" in shown.stderr  # a bar with its total
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert read_manifest(Path(metrics["shards"])).config["amg"] == recorded


def test_eval_stops_when_sam_keeps_no_mask(tmp_path):
    voc = write_voc(tmp_path / "VOC2012")
    ckpt = head_checkpoint(tmp_path / "head.ckpt")
    strict = ["amg.pred_iou_thresh=0.999", "amg.stability_score_thresh=0.999"]
    with pytest.raises(ShardSetError, match=r"SAM kept no mask in any of the 2 images .*amg\."):
        run(compose_eval(tmp_path, f"ckpt={ckpt}", f"eval_data.source.root={voc}", *strict))


def test_eval_refuses_a_head_from_another_sam(tmp_path):
    ckpt = head_checkpoint(tmp_path / "head.ckpt", sam="vit_b")
    cfg = compose_eval(tmp_path, f"eval_data.source.root={write_voc(tmp_path / 'VOC')}")
    cfg.ckpt = str(ckpt)
    with pytest.raises(EvaluationError, match="run with sam=vit_b"):
        run(cfg)


def _subset(name: str, destination: Path, count: int) -> Path:
    """The first ``count`` images of a shared subset, in its own layout."""
    source = SHARED_DATA / name
    if name == "voc2012-mini":
        ids = (source / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:count]
        (destination / "ImageSets" / "Segmentation").mkdir(parents=True)
        (destination / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids))
        for folder, suffix in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
            (destination / folder).mkdir()
            for image_id in ids:
                shutil.copy(source / folder / f"{image_id}{suffix}", destination / folder)
        return destination
    labels = sorted((source / "labels" / "train2017").glob("*.txt"))
    stems = [p.stem for p in labels if (source / "images" / "train2017" / f"{p.stem}.jpg").exists()]
    for folder, suffix in (("images", ".jpg"), ("labels", ".txt")):
        (destination / folder / "train2017").mkdir(parents=True)
        for stem in stems[:count]:
            shutil.copy(
                source / folder / "train2017" / f"{stem}{suffix}",
                destination / folder / "train2017",
            )
    return destination


def assert_headline_is_the_per_class_mean(run_dir: Path, metrics: dict) -> None:
    """mIoU and mAP50 average the classes per_class.csv scores (6 digits), no others."""
    with open(run_dir / "per_class.csv") as handle:
        rows = list(csv.DictReader(handle))
    for headline, column in (("mIoU", "iou"), ("mAP50", "ap50")):
        cells = [float(row[column]) for row in rows if row[column]]
        assert metrics[headline] == pytest.approx(sum(cells) / len(cells), rel=1e-5, abs=1e-9)


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not on this machine")
@pytest.mark.parametrize(
    ("eval_data", "subset", "classes"),
    [("voc_val", "voc2012-mini", "voc20"), ("coco128", "coco128-seg", "coco80")],
)
def test_eval_end_to_end_on_real_subsets(tmp_path, eval_data, subset, classes):
    root = _subset(subset, tmp_path / subset, 3)
    ckpt = head_checkpoint(tmp_path / "head.ckpt", classes)
    command = [
        sys.executable, "-m", "usam.eval", f"eval_data={eval_data}",
        f"eval_data.source.root={root}", f"ckpt={ckpt}", f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}", *SMALL,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM WEIGHTS: these numbers check the evaluation pipeline" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["masks"] > 0
    assert metrics["instances_derived"] is (eval_data == "voc_val")  # VOC-mini has no objects
    assert_headline_is_the_per_class_mean(tmp_path / "run", metrics)
    assert len(list((tmp_path / "run" / "overlays").glob("*.png"))) == 2


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not on this machine")
def test_the_sam3_baseline_runs_on_voc_mini(tmp_path):
    """``usam.eval baseline=sam3`` with a tiny random SAM 3 on real VOC photos: the same
    files as the head's evaluation, marked not meaningful."""
    root = _subset("voc2012-mini", tmp_path / "voc2012-mini", 3)
    command = [
        sys.executable, "-m", "usam.eval", "baseline=sam3", "baseline.sam3.model=tiny",
        "baseline.sam3.score_threshold=0", "inference.confidence_threshold=0.2",
        "eval_data=voc_val", f"eval_data.source.root={root}", "device=cpu", "num_overlays=1",
        f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM WEIGHTS: these numbers check the evaluation pipeline" in result.stdout
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["baseline"] == "sam3" and metrics["images"] == 3 and not metrics["meaningful"]
    assert_headline_is_the_per_class_mean(run_dir, metrics)
    for name in ("per_class.csv", "sweep.csv", "sweep.png"):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "overlays").glob("*.png"))) == 1


def test_a_head_for_other_classes_is_refused_before_any_image_is_extracted(tmp_path):
    root = tmp_path / "coco128-seg"
    (root / "images" / "train2017").mkdir(parents=True)
    Image.new("RGB", (64, 48), (90, 120, 30)).save(root / "images" / "train2017" / "a.jpg")
    ckpt = head_checkpoint(tmp_path / "head.ckpt")  # a VOC head
    cfg = compose_eval(tmp_path, "eval_data=coco128", f"eval_data.source.root={root}")
    cfg.ckpt = str(ckpt)
    with pytest.raises(
        EvaluationError, match=r"predicts 20 .* eval_data=coco128 is annotated with 80"
    ):
        run(cfg)
    assert not (tmp_path / "data" / "shards").exists()  # nothing extracted first


@pytest.mark.parametrize(
    ("eval_data", "key"),
    [
        ("voc_val", "eval_data.source.root"),
        ("coco128", "eval_data.source.root"),
        ("ade20k", "eval_data.source.root"),
        ("coco_val", "eval_data.source.annotation_file"),
    ],
)
def test_a_missing_dataset_names_the_key_to_set(tmp_path, eval_data, key):
    cfg = compose_eval(tmp_path, f"eval_data={eval_data}")
    with pytest.raises(InstantiationException) as caught:
        run(cfg)
    line = user_error_line(caught.value)
    assert line.startswith("eval_data.source: ") and f"{key}" in line.split("; ", 1)[1], line
