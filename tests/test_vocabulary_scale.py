"""Vocabularies past uint8's 254 classes: LVIS-sized (1,203 made-up names) label maps,
metrics, exports, and a synthetic set that trains and is scored end to end."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from usam.core.labels import MAX_CLASSES, ignore_from_disk, ignore_value, label_dtype
from usam.data.datamodule import ShardDataModule
from usam.data.eval_datasets import load_ground_truth
from usam.data.ground_truth import (
    DatasetError,
    GroundTruth,
    Instance,
    check_values,
    instances_from_semantic,
    paint_instances,
    read_index_png,
    to_superclasses,
)
from usam.evaluation.metrics import metric_collection
from usam.evaluation.scoring import evaluate
from usam.formats.embedding_shards import iter_records
from usam.inference.exports import save_overlay, save_semantic
from usam.inference.predictor import InferenceSettings, Predictor, load_head
from usam.inference.semantic_map import semantic_from_instances
from usam.testing.synthetic import (
    GROUND_TRUTH_FILE,
    numbered_classes,
    prototypes,
    write_synthetic_eval_set,
    write_synthetic_shard_set,
)
from usam.train.lightning_modules import TeacherModule

from helpers.commands import ROOT, run_python
from helpers.shards import quiet_trainer

LVIS_SIZE = 1203
CLASSES = numbered_classes(LVIS_SIZE)
WIDE_IGNORE = 65535


def test_maps_are_uint8_up_to_254_classes_and_uint16_beyond():
    assert label_dtype(254) == np.uint8 and label_dtype(255) == np.uint16
    assert label_dtype(LVIS_SIZE) == np.uint16
    assert ignore_value(np.uint8) == 255 and ignore_value(np.uint16) == WIDE_IGNORE
    with pytest.raises(ValueError, match="label maps hold"):
        label_dtype(MAX_CLASSES + 1)
    voc_file = np.array([[0, 7, 255]], np.uint8)
    same = ignore_from_disk(voc_file, 20)
    assert same.dtype == np.uint8 and same.tolist() == [[0, 7, 255]]
    wide = ignore_from_disk(voc_file, LVIS_SIZE)  # VOC's 255 = ignore, read into uint16
    assert wide.dtype == np.uint16 and wide.tolist() == [[0, 7, WIDE_IGNORE]]
    sixteen_bit_file = np.array([[1203, 255, WIDE_IGNORE]], np.uint16)  # 255 is class 254
    assert ignore_from_disk(sixteen_bit_file, LVIS_SIZE).tolist() == [[1203, 255, WIDE_IGNORE]]


def test_semantic_map_paints_labels_past_254():
    masks = np.zeros((2, 2, 3), bool)
    masks[0, :, :2] = True  # class 1000, the better score
    masks[1, :, 1:] = True  # class 3
    semantic = semantic_from_instances(masks, [1000, 3], [0.9, 0.5], (2, 3))
    assert semantic.dtype == np.uint16 and semantic.tolist() == [[1001, 1001, 4]] * 2
    small = semantic_from_instances(masks, [253, 3], [0.9, 0.5], (2, 3))
    assert small.dtype == np.uint8 and small.tolist() == [[254, 254, 4]] * 2


def _scores(prediction_label: int, truth: GroundTruth, mask: np.ndarray) -> dict[str, float]:
    metrics = metric_collection(CLASSES, sync_on_compute=False)
    semantic = semantic_from_instances(mask[None], [prediction_label], [0.8], mask.shape)
    metrics.update(
        semantic=semantic, masks=mask[None], labels=[prediction_label], scores=[0.8], truth=truth
    )
    return {k: float(v) for k, v in metrics.compute().items()}


def test_metrics_score_a_class_past_254_and_skip_65535():
    mask = np.zeros((4, 6), bool)
    mask[:, :3] = True
    truth_map = paint_instances([Instance(mask, 1000)], mask.shape, LVIS_SIZE)
    truth_map[:, 3] = WIDE_IGNORE  # void column: predicting class 1000 there costs nothing
    truth = GroundTruth(truth_map, [Instance(mask, 1000)])
    predicted = mask.copy()
    predicted[:, 3] = True
    right = _scores(1000, truth, predicted)
    assert right["iou/class 1000"] == 100.0 and right["iou/background"] == 100.0
    # mask IoU 12 / 16 passes 0.5: COCO's 101-point AP of one hit, 1 up to float64 rounding
    assert right["ap50/class 1000"] == pytest.approx(1.0, abs=1e-12)
    assert right["mAP50"] == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(right["iou/class 0999"])  # in neither map: no IoU
    wrong = _scores(999, truth, mask)  # one class off, the uint8 wrap of 1000 is 232
    assert wrong["iou/class 1000"] == 0.0 and wrong["iou/class 0999"] == 0.0
    assert wrong["mAP50"] == 0.0
    with pytest.raises(ValueError, match="ground truth values"):
        _scores(1000, GroundTruth(np.full((4, 6), 1205, np.uint16), []), mask)


def test_ground_truth_reads_keep_vocs_255_and_16_bit_files(tmp_path):
    voc_style = np.array([[0, 200, 255]], np.uint8)
    checked = check_values(voc_style, LVIS_SIZE, "voc-style.png")
    assert checked.dtype == np.uint16 and checked.tolist() == [[0, 200, WIDE_IGNORE]]
    path = tmp_path / "lvis.png"
    Image.fromarray(np.array([[0, 1203, 255, WIDE_IGNORE]], np.uint16)).save(path)
    read = check_values(read_index_png(path), LVIS_SIZE, path)
    assert read.dtype == np.uint16 and read.tolist() == [[0, 1203, 255, WIDE_IGNORE]]
    with pytest.raises(DatasetError, match="1300"):
        check_values(np.array([[1300]], np.uint16), LVIS_SIZE, path)
    crowd = np.zeros((2, 2), bool)
    crowd[0] = True
    painted = paint_instances([Instance(~crowd, 700), Instance(crowd, 5, True)], (2, 2), 1203)
    assert painted.tolist() == [[WIDE_IGNORE] * 2, [701] * 2]
    assert [i.label for i in instances_from_semantic(painted)] == [700]
    coarse = to_superclasses(GroundTruth(painted, []), {700: 300})
    assert coarse.semantic.dtype == np.uint16
    assert coarse.semantic.tolist() == [[WIDE_IGNORE] * 2, [301] * 2]


def test_semantic_pngs_are_16_bit_past_254_classes_and_palette_otherwise(tmp_path):
    wide = np.array([[0, 1, 300, 1203]], np.uint16)
    save_semantic(wide, tmp_path / "wide.png", LVIS_SIZE)
    with Image.open(tmp_path / "wide.png") as png:
        assert png.mode == "I;16"
    assert read_index_png(tmp_path / "wide.png").tolist() == wide.tolist()
    small = np.array([[0, 1, 20]], np.uint8)  # a map of few labels of the large vocabulary
    save_semantic(small, tmp_path / "lvis_few.png", LVIS_SIZE)
    with Image.open(tmp_path / "lvis_few.png") as png:
        assert png.mode == "I;16"  # the vocabulary decides, so one run's files share a format
    save_semantic(small, tmp_path / "voc.png", 20)
    with Image.open(tmp_path / "voc.png") as png:
        assert png.mode == "P" and np.array(png).tolist() == small.tolist()
    image = np.full((1, 4, 3), 90, np.uint8)
    save_overlay(image, wide, CLASSES, tmp_path / "overlay.jpg")  # labels past the palette
    save_overlay(image[:, :3], small, CLASSES[:20], tmp_path / "voc_overlay.jpg")
    for name, width in (("overlay.jpg", 4), ("voc_overlay.jpg", 3)):
        with Image.open(tmp_path / name) as overlay:
            assert overlay.width == width and overlay.height > 1


SEED = 5
SHOWN = (0, 253, 254, 255, 700, 1000, 1202)  # the eval set's image classes: both sides of 254


def _reference_ious(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per-class IoU in percent (NaN where a class is in neither map) from a numpy
    confusion matrix: a second implementation beside the metric's."""
    size = LVIS_SIZE + 1
    confusion = np.zeros((size, size), np.int64)
    for prediction, truth in pairs:
        scored = truth != WIDE_IGNORE
        np.add.at(confusion, (truth[scored].astype(np.int64), prediction[scored]), 1)
    hits = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, 100 * hits / union, np.nan)


class NearestPrototype(Predictor):
    """Each mask gets its nearest prototype's class (background for the shared ones): the
    synthetic set's right answer, so that classes past 254 are predicted where they are."""

    def mask_probabilities(self, record):
        classes, background = prototypes(LVIS_SIZE, 1024, SEED)
        centres = np.concatenate([background, classes])
        distances = ((record.embeddings[:, None].astype(np.float32) - centres) ** 2).sum(-1)
        nearest = distances.argmin(1) - len(background) + 1  # 0 for any background one
        return np.eye(LVIS_SIZE + 1, dtype=np.float32)[np.maximum(nearest, 0)]


@pytest.fixture(scope="module")
def lvis_sized_run(tmp_path_factory):
    """A teacher fitted for a few steps on 1,203 synthetic classes, and an eval set."""
    root = tmp_path_factory.mktemp("lvis")
    shape = {"masks_per_image": (4, 6), "foreground_fraction": 0.5, "noise": 0.3, "seed": SEED}
    for split in ("train", "val"):
        write_synthetic_shard_set(
            root / split, classes=CLASSES, split=split, images_per_class=1, **shape
        )
    eval_dir = root / "eval"
    write_synthetic_eval_set(eval_dir, classes=CLASSES, image_classes=SHOWN, **shape)
    L.seed_everything(0)
    datamodule = ShardDataModule(
        classes=CLASSES,
        train_dir=str(root / "train"),
        val_dir=str(root / "val"),
        source="synthetic",
        sam_model_type="tiny",
        batch_size=64,
    )
    head = {"hidden_dims": [128, 64, 64], "dropout": 0.0}
    teacher = TeacherModule(CLASSES, head=head, top_k=0.5, sam_model_type="tiny")
    trainer = quiet_trainer(root, max_steps=20, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(teacher, datamodule=datamodule)
    checkpoint = root / "teacher.ckpt"
    trainer.save_checkpoint(checkpoint)
    return eval_dir, load_head(checkpoint), trainer.callback_metrics


def _scored_against_reference(eval_dir, predictor: Predictor) -> tuple[dict, np.ndarray, set]:
    """``evaluate``'s scores, the reference IoUs of the same predictions and the classes
    predicted."""
    evaluation = evaluate(eval_dir, predictor)
    pairs, predicted = [], set()
    for record in iter_records(eval_dir):
        truth = load_ground_truth(record.ground_truth)
        assert truth.semantic.dtype == np.uint16
        prediction = predictor(record)
        predicted |= set(prediction.labels.tolist())
        pairs.append((prediction.semantic_map().astype(np.int64), truth.semantic))
    assert evaluation.images == len(SHOWN) == len(pairs)
    reference = _reference_ious(pairs)
    ious = np.array([evaluation.scores[f"iou/{name}"] for name in ["background", *CLASSES]])
    np.testing.assert_allclose(ious, reference, rtol=1e-9, equal_nan=True)
    assert evaluation.scores["mIoU"] == pytest.approx(np.nanmean(reference), rel=1e-9)
    return evaluation.scores, reference, predicted


def test_a_1203_class_synthetic_set_trains_and_its_head_is_scored(lvis_sized_run):
    eval_dir, head, logged = lvis_sized_run
    assert np.isfinite(float(logged["train/loss"])) and np.isfinite(float(logged["val/loss"]))
    assert len(head.classes) == LVIS_SIZE and head.head(torch.zeros(2, 1024)).shape == (2, 1204)
    assert (eval_dir / GROUND_TRUTH_FILE).is_file()
    predictor = Predictor(head, InferenceSettings(confidence_threshold=0.0), device="cpu")
    scores, _, predicted = _scored_against_reference(eval_dir, predictor)
    assert max(predicted) > 254  # a few steps do not learn 1,203 classes: these are guesses
    assert 0.0 <= scores["mAP50"] <= 1.0


def test_labels_past_254_predicted_where_they_are_score_as_hits(lvis_sized_run):
    eval_dir, head, _ = lvis_sized_run
    predictor = NearestPrototype(head, InferenceSettings(confidence_threshold=0.5), "cpu")
    scores, reference, predicted = _scored_against_reference(eval_dir, predictor)
    assert predicted == set(SHOWN)
    for label in SHOWN:  # each class is hit, and scored as the numpy reference scores it
        assert reference[label + 1] > 0 and scores[f"ap50/{CLASSES[label]}"] > 0
    assert math.isnan(scores[f"ap50/{CLASSES[1]}"])  # no ground truth: no AP


@pytest.mark.slow
def test_the_benchmark_prints_a_row_per_vocabulary_size():
    small = ("--masks", "16", "--batch-size", "2", "--steps", "1", "--eval-images", "1")
    result = run_python(
        str(ROOT / "benchmarks" / "vocabulary_scale.py"),
        *small,
        *("--height", "40", "--width", "50", "--outputs", "1204"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line[:3] == "| 1"]
    assert len(rows) == 1, result.stdout
    outputs, parameters, *measured = (cell.strip().replace(",", "") for cell in rows[0])
    head = TeacherModule(CLASSES).head
    assert int(outputs) == 1204 and int(parameters) == sum(p.numel() for p in head.parameters())
    train_ms, train_mib, eval_ms, eval_mib, compute_s = map(float, measured)
    assert min(train_ms, eval_ms, compute_s) > 0  # each part ran and was timed
    # peak RSS above what the process held before: a high-water mark reached earlier (while
    # the batch was built) can hide the part's own growth, so no more than 0 is promised
    assert min(train_mib, eval_mib) >= 0
