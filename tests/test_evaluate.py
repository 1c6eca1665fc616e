"""Evaluation on a tiny VOC-layout set extracted with the random tiny SAM: the loop against a
direct computation, the sweep, the written outputs, overlays, and the fit-time callback."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from usam.core.provenance import Provenance
from usam.core.vocabulary import load_vocabulary
from usam.data.datamodule import ShardDataModule
from usam.data.eval_datasets import ADE20K, load_ground_truth
from usam.data.sources import ImageSource
from usam.evaluation.callback import EvaluationCallback
from usam.evaluation.reports import write_outputs
from usam.evaluation.scoring import (
    SWEEP_ON_TEST,
    EvaluationError,
    evaluate,
    provenance_of,
    resolve_vocabulary,
)
from usam.formats.embedding_shards import (
    Manifest,
    ShardSetError,
    ShardSetWriter,
)
from usam.inference.predictor import InferenceSettings, Predictor, load_head
from usam.testing.synthetic import write_synthetic_shard_set
from usam.train.lightning_modules import TeacherModule
from usam.viz.overlays import blend, voc_palette

from helpers.evaluation import FAST, GRID, direct, head_checkpoint
from helpers.shards import record_of_masks

LOW = InferenceSettings(confidence_threshold=0.3, nms_iou=0.5)


def confusion_miou(maps: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> float:
    """mIoU from one confusion matrix over all pixels, classes that never occur left out."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for prediction, truth in maps:
        keep = truth != 255
        np.add.at(confusion, (truth[keep], prediction[keep]), 1)
    hits = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - hits
    return float(np.mean(100 * hits[union > 0] / union[union > 0]))


class OracleHead(Predictor):
    """Scores each SAM mask by the ground truth under it (majority class, its pixel share),
    so that mAP50 and the sweep have real hits to count."""

    def mask_probabilities(self, record):
        truth = load_ground_truth(record.ground_truth).semantic
        probs = np.zeros((record.num_masks, len(self.classes) + 1))
        probs[:, 0] = 1.0
        for index, rle in enumerate(record.coco_rles()):
            under = truth[mask_utils.decode(rle).astype(bool)]
            under = under[(under > 0) & (under < 255)]
            if under.size:
                label = np.bincount(under).argmax()
                share = (under == label).sum() / max(under.size, 1)
                probs[index, [0, label]] = 1 - share, share
        return probs


def truth_mask_set(source: ImageSource, directory: Path, unseen: int | None = None) -> Path:
    """An eval shard set whose masks are the ground-truth instances plus one background-only
    mask, as a perfect SAM would give them; instances of class ``unseen`` are left out, so
    their pixels stay uncovered."""
    manifest = Manifest(list(source.classes), 1024, "eval", {"model_type": "tiny"})
    rng = np.random.default_rng(0)
    with ShardSetWriter(directory, manifest) as writer:
        for image in source:
            truth = load_ground_truth(image.ground_truth)
            background = truth.semantic == 0
            kept = [i.mask for i in truth.instances if i.label != unseen]
            masks = kept + [background] * bool(background.any())
            shape = truth.semantic.shape
            writer.write(record_of_masks(image.key, masks, shape, image.ground_truth, rng))
    return directory


def test_perfect_masks_and_scores_give_100_miou_and_map50_1(voc_set, tmp_path):
    source, _ = voc_set
    directory = truth_mask_set(source, tmp_path / "truth")
    oracle = OracleHead(load_head(head_checkpoint(tmp_path / "head.ckpt")), LOW)
    evaluation = evaluate(directory, oracle, sweep=GRID)
    perfect = {"mIoU": 100.0, "mAP50": 1.0, "mAP50-95": 1.0}
    assert evaluation.headline == pytest.approx(perfect)
    assert evaluation.detections == 19 + 2  # the VOC photo's objects, the drawn cat and dog
    occurring = {s.name for s in evaluation.per_class if not math.isnan(s.values["iou"])}
    assert occurring == {"background", "bottle", "chair", "dining table", "person", "cat", "dog"}
    found = {s.name for s in evaluation.per_class if s.values["ap50"] == pytest.approx(1.0)}
    assert found == occurring - {"background"}  # AP50 of every class with instances
    for point in evaluation.sweep:
        if point.confidence_threshold > 0:
            assert point.scores == pytest.approx(perfect)
        else:  # the background mask passes as its argmax class and paints the background
            assert point.scores["mIoU"] < 100.0 and point.scores["mAP50"] == pytest.approx(1.0)


def write_ade(root: Path) -> ADE20K:
    """Two ADE20K-layout images of wall, building and sky, with unlabelled (0) pixels."""
    for folder in ("images", "annotations"):
        (root / folder / "validation").mkdir(parents=True)
    (root / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n2\t0.1\t1\t1\tbuilding, edifice\n"
        "3\t0.1\t1\t1\tsky\n"
    )
    labels = np.zeros((24, 32), np.uint8)
    labels[:8] = 3  # sky
    labels[8:, :20] = 1  # wall
    labels[8:, 20:] = 2  # building
    labels[:, 30:] = 0  # unlabelled
    for number, values in enumerate((labels, labels[::-1]), start=1):
        rgb = np.stack([values * 60] * 3, axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / "validation" / f"ADE_val_{number}.jpg")
        Image.fromarray(values, mode="L").save(
            root / "annotations" / "validation" / f"ADE_val_{number}.png"
        )
    return ADE20K(root)


def test_ade20k_scores_150_classes_and_uncovered_pixels_as_misses(tmp_path):
    source = write_ade(tmp_path / "ADE")
    sky = source.classes.index("sky")
    directory = truth_mask_set(source, tmp_path / "truth", unseen=sky)
    head = load_head(head_checkpoint(tmp_path / "head.ckpt", list(source.classes)))
    evaluation = evaluate(directory, OracleHead(head, LOW))
    scores = {s.name: s.values["iou"] for s in evaluation.per_class}
    # no mask covers the sky: a miss for sky (IoU 0), not a background class beside it
    assert math.isnan(scores.pop("background"))
    assert scores == {"wall": 100.0, "building": 100.0, "sky": 0.0}
    # a background class would make it 50
    assert evaluation.scores["mIoU"] == pytest.approx(200 / 3)


def test_evaluation_matches_a_direct_computation(voc_set, tmp_path):
    source, directory = voc_set
    predictor = Predictor.from_checkpoint(head_checkpoint(tmp_path / "head.ckpt"), LOW)
    evaluation = evaluate(directory, predictor, sweep=GRID, num_samples=2, source=source)
    maps, scores = direct(directory, predictor)
    assert evaluation.images == 2 and evaluation.detections > 0
    assert evaluation.scores == pytest.approx(scores, nan_ok=True)
    assert evaluation.scores["mIoU"] == pytest.approx(confusion_miou(maps, 21))
    assert evaluation.instances_derived  # the drawn image has no SegmentationObject
    assert [s.name for s in evaluation.per_class] == ["background", *source.classes]
    scored = {s.name: s.values for s in evaluation.per_class}
    assert math.isnan(scored["background"]["ap50"]) and not math.isnan(scored["person"]["iou"])
    for index, name in enumerate(["background", *source.classes]):
        occurs = any((p == index).any() or (t == index).any() for p, t in maps)
        assert math.isnan(scored[name]["iou"]) == (not occurs), name  # no IoU without a pixel
    logged = evaluation.scalars()  # headline always, per-class where defined
    assert "iou/person" in logged and "ap50/person" in logged and "iou/aeroplane" not in logged
    for sample, (prediction, truth) in zip(evaluation.samples, maps):
        np.testing.assert_array_equal(sample.prediction, prediction)
        np.testing.assert_array_equal(sample.truth, truth)
    # every sweep point equals a separate evaluation with those settings
    assert len(evaluation.sweep) == 6
    for point in (evaluation.sweep[0], evaluation.sweep[3], evaluation.sweep[5]):
        settings = InferenceSettings(point.confidence_threshold, point.nms_iou)
        alone = evaluate(directory, type(predictor)(predictor.checkpoint, settings))
        assert point.scores == pytest.approx(alone.headline, nan_ok=True)
    # the thresholds matter on this set, so the comparison above means something
    assert len({tuple(p.scores.values()) for p in evaluation.sweep}) >= 3


def test_outputs_overlays_and_random_weights(voc_set, tmp_path):
    source, directory = voc_set
    predictor = Predictor.from_checkpoint(head_checkpoint(tmp_path / "head.ckpt"), LOW)
    evaluation = evaluate(directory, predictor, sweep=GRID, num_samples=1, source=source)
    write_outputs(evaluation, tmp_path / "out", {"checkpoint": "head.ckpt"})
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(evaluation.scores["mIoU"])
    assert metrics["mAP50"] == pytest.approx(evaluation.scores["mAP50"])
    assert metrics["mAP50-95"] == pytest.approx(evaluation.scores["mAP50-95"])
    assert metrics["per_class"][15] == {
        "name": "person",
        "iou": pytest.approx(evaluation.scores["iou/person"]),
        "ap50": pytest.approx(evaluation.scores["ap50/person"]),
    }
    assert metrics["images"] == 2 and metrics["checkpoint"] == "head.ckpt"
    assert metrics["meaningful"] is False and metrics["not_meaningful_because"] == [
        "the head's training data: synthetic embeddings (no SAM)",
        "evaluation masks: an untrained SAM (tiny)",
    ]
    assert metrics["inference"]["confidence_threshold"] == 0.3
    with open(tmp_path / "out" / "per_class.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["class"] for row in table] == ["background", *source.classes]
    assert list(table[0]) == ["class", "iou", "ap50", "random_weights"]
    assert table[0]["ap50"] == ""
    assert float(table[0]["iou"]) == pytest.approx(evaluation.scores["iou/background"], abs=1e-3)
    assert float(table[15]["ap50"]) == pytest.approx(evaluation.scores["ap50/person"], abs=1e-5)
    with open(tmp_path / "out" / "sweep.csv") as handle:
        sweep = list(csv.reader(handle))
    header = ["confidence_threshold", "nms_iou", "mIoU", "mAP50", "mAP50-95"]
    header += ["random_weights", "analysis"]
    assert sweep[0] == header and len(sweep) == 7
    assert {row[-2] for row in sweep[1:]} == {"True"} == {row["random_weights"] for row in table}
    # thresholds scored on the test images are labelled as such wherever the sweep goes
    assert {row[-1] for row in sweep[1:]} == {SWEEP_ON_TEST}
    assert "test data, not model selection" in SWEEP_ON_TEST
    assert metrics["threshold_sweep"]["analysis"] == SWEEP_ON_TEST
    assert [
        (p["confidence_threshold"], p["nms_iou"], p["mAP50"], p["mAP50-95"])
        for p in metrics["threshold_sweep"]["points"]
    ] == [
        (p.confidence_threshold, p.nms_iou, *list(p.scores.values())[1:]) for p in evaluation.sweep
    ]
    assert [float(row[3]) for row in sweep[1:]] == [
        pytest.approx(p.scores["mAP50"], abs=1e-5) for p in evaluation.sweep
    ]
    with Image.open(tmp_path / "out" / "sweep.png") as plot:
        assert plot.width > plot.height > 100
    # the overlay of the first image (the VOC photo): photo | truth | prediction
    sample = evaluation.samples[0]
    with Image.open(tmp_path / "out" / "overlays" / f"{sample.key}.png") as png:
        panel = np.asarray(png.convert("RGB"))
    height, width = sample.truth.shape
    assert panel.shape[1] == 3 * width + 8 and panel.shape[0] > height + 18
    photo = np.asarray(source.load(0).image)
    np.testing.assert_array_equal(panel[18 : 18 + height, :width], photo)
    truth_panel = panel[18 : 18 + height, width + 4 : 2 * width + 4]
    np.testing.assert_array_equal(truth_panel, blend(photo, sample.truth))
    person = sample.truth == 15
    assert person.any() and not np.array_equal(truth_panel[person], photo[person])


def test_provenance_names_the_head_and_the_evaluation_masks(tmp_path):
    manifest = Manifest(["cat"], 1024, "eval", {"model_type": "vit_h", "random_weights": False})
    trained = Predictor.from_checkpoint(head_checkpoint(tmp_path / "a.ckpt", random=False))
    assert provenance_of(manifest, trained) == Provenance()
    manifest.synthetic = True
    manifest.sam["random_weights"] = True
    assert provenance_of(manifest, trained).reasons == (
        "evaluation masks: synthetic embeddings (no SAM)",
        "evaluation masks: an untrained SAM (vit_h)",
    )
    untrained = Predictor.from_checkpoint(head_checkpoint(tmp_path / "b.ckpt"))
    reasons = provenance_of(manifest, untrained).reasons
    assert reasons[0] == "the head's training data: synthetic embeddings (no SAM)"
    assert len(reasons) == 3


def test_voc_palette_is_the_one_imgviz_and_voc_use():
    import imgviz

    np.testing.assert_array_equal(voc_palette(), imgviz.label_colormap())
    assert voc_palette()[255].tolist() == [224, 224, 192]


def test_superclass_heads_and_mismatches(voc_set, tmp_path):
    source, directory = voc_set
    coarse = Predictor.from_checkpoint(
        head_checkpoint(tmp_path / "super.ckpt", "voc_superclasses"), LOW
    )
    assert resolve_vocabulary(coarse.classes).parent == "voc20"
    evaluation = evaluate(directory, coarse)
    names = [s.name for s in evaluation.per_class]
    assert names == ["background", *load_vocabulary("voc_superclasses").classes]
    assert not math.isnan(evaluation.scores["iou/person"])
    coco = Predictor.from_checkpoint(head_checkpoint(tmp_path / "coco.ckpt", "coco80"))
    with pytest.raises(EvaluationError, match="annotated with 20"):
        evaluate(directory, coco)
    other_sam = Predictor.from_checkpoint(head_checkpoint(tmp_path / "b.ckpt", sam="vit_b"))
    with pytest.raises(ShardSetError, match="SAM model type differs"):
        evaluate(directory, other_sam)
    with pytest.raises(EvaluationError, match="lists other classes"):
        resolve_vocabulary(coarse.classes, "voc20")


def test_callback_logs_scores_during_fit_validate_and_test(voc_set, tmp_path):
    source, eval_dir = voc_set
    for split in ("train", "val"):
        write_synthetic_shard_set(
            tmp_path / split,
            classes="voc20",
            split=split,
            images_per_class=2,
            masks_per_image=(4, 8),
            seed=1,
        )
    datamodule = ShardDataModule(
        "voc20",
        str(tmp_path / "train"),
        str(tmp_path / "val"),
        source="synthetic",
        sam_model_type="tiny",
        batch_size=16,
    )
    module = TeacherModule(list(load_vocabulary("voc20").classes), sam_model_type="tiny")
    callback = EvaluationCallback(
        eval_dir,
        source,
        inference=InferenceSettings(confidence_threshold=0.04),
        every_n_epochs=2,
        num_overlays=1,
        output_dir=tmp_path / "eval",
    )
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=1,
        **FAST,
    )
    trainer.fit(module, datamodule=datamodule)
    metrics = trainer.callback_metrics
    logged = {"val/mIoU", "val/mAP50", "val/mAP50-95", "val/iou/person", "val/ap50/person"}
    assert logged <= set(metrics)
    assert metrics["val/eval/random_weights"] == 1.0  # synthetic head and evaluation set
    assert "val/iou/aeroplane" not in metrics  # no IoU for a class that never occurs
    assert "val/ap50/aeroplane" not in metrics  # nor AP for one without instances
    # every second epoch only, never the sanity check
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["val-epoch001"]
    assert len(list((tmp_path / "eval" / "val-epoch001" / "overlays").glob("*.png"))) == 1
    # a standalone validation always evaluates, whatever the epoch
    trainer.validate(module, datamodule=datamodule, verbose=False)
    assert (tmp_path / "eval" / "val-epoch003").is_dir()
    # at test time with the final head, the same numbers as evaluating its checkpoint
    trainer.test(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    saved = Predictor.from_checkpoint(tmp_path / "final.ckpt", InferenceSettings(0.04))
    expected = evaluate(eval_dir, saved).scalars()
    tested = {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items()}
    for name, value in expected.items():  # float32 once logged
        assert tested[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_callback_refuses_a_missing_eval_set(tmp_path):
    callback = EvaluationCallback(tmp_path / "nowhere")
    module = TeacherModule(["cat", "dog"], sam_model_type="tiny")
    with pytest.raises(ShardSetError, match="python -m usam.eval"):
        callback.setup(L.Trainer(logger=False, **FAST), module, "fit")
