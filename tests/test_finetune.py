"""Fine-tuning a head on reviewed masks: which class each SAM proposal takes, that a head which
starts wrong learns the reviewed classes, the checkpoint it writes, the MIL term on generated
images, and ``usam.fit stage=finetune`` end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from usam.core.provenance import Provenance
from usam.data.datamodule import ShardDataModule
from usam.formats.embedding_shards import ImageRecord, encode_mask
from usam.inference.exports import LabelledImage
from usam.inference.label_studio import ImageAddresses, LabelStudioSettings, label_studio_tasks
from usam.inference.predictor import load_head
from usam.review.finetune import (
    FineTuneError,
    FineTuneSettings,
    finetune_head,
    head_arguments,
    proposal_targets,
)
from usam.review.reviewed import Review, ReviewedImage
from usam.testing.synthetic import make_record, prototypes
from usam.train.head import select_input_view
from usam.train.lightning_modules import StudentModule, TeacherModule

from helpers.commands import TINY_EXTRACT, run_entry
from helpers.evaluation import head_checkpoint
from helpers.review_exports import prediction_of
from helpers.wandb_runs import offline_record

CLASSES = ["cat", "dog", "bird"]
EMBED_DIM = 64


def record_of(masks: np.ndarray) -> ImageRecord:
    """A record whose proposals are ``masks`` (N, H, W); nothing else about it matters here."""
    count, height, width = masks.shape
    return ImageRecord(
        key="hand",
        height=height,
        width=width,
        embeddings=np.zeros((count, 8), np.float16),
        iou_preds=np.ones(count, np.float32),
        stability=np.ones(count, np.float32),
        boxes=np.zeros((count, 4), np.float32),
        points=np.zeros((count, 2), np.float32),
        multimask=np.zeros(count, np.int8),
        rles=[encode_mask(mask)["counts"] for mask in masks],
        source={"path": "hand.png"},
    )


def box(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[rows, cols] = True
    return mask


def reviewed(masks: list[np.ndarray], labels: list[int]) -> ReviewedImage:
    height, width = masks[0].shape
    return ReviewedImage("hand.png", height, width, np.stack(masks), np.array(labels, np.int64))


TOP = box(10, 10, slice(0, 5), slice(None))  # 50 pixels
BOTTOM = box(10, 10, slice(5, 10), slice(None))
PROPOSALS = np.stack(
    [
        TOP,  # IoU 1 with the top region
        box(10, 10, slice(0, 5), slice(0, 5)),  # 25 of the top's 50 pixels: IoU 0.5 exactly
        box(10, 10, slice(0, 5), slice(0, 4)),  # 20 of 50: IoU 0.4
        BOTTOM,
        np.zeros((10, 10), bool),  # an empty proposal overlaps nothing
    ]
)


def test_a_proposal_takes_the_class_of_the_region_it_matches_at_the_threshold():
    review = reviewed([TOP, BOTTOM], [2, 0])
    targets = proposal_targets(record_of(PROPOSALS), review, 0.5)
    assert targets.dtype == np.int64
    assert targets.tolist() == [3, 3, 0, 1, 0]
    assert proposal_targets(record_of(PROPOSALS), review, 0.6).tolist() == [3, 0, 0, 1, 0]


def test_equal_regions_give_the_earlier_ones_class_and_no_region_gives_background():
    assert proposal_targets(record_of(PROPOSALS), reviewed([TOP, TOP], [1, 0]), 0.5).tolist() == [
        2,
        2,
        0,
        0,
        0,
    ]
    nothing = ReviewedImage("hand.png", 10, 10, np.zeros((0, 10, 10), bool), np.zeros(0, np.int64))
    assert proposal_targets(record_of(PROPOSALS), nothing, 0.5).tolist() == [0] * 5


def test_reviewed_masks_are_resized_to_a_downscaled_records_grid():
    """The file is 20 x 20, SAM saw it at 10 x 10: a region drawn on the file's pixels."""
    top = box(20, 20, slice(0, 10), slice(None))
    bottom = box(20, 20, slice(10, 20), slice(None))
    targets = proposal_targets(record_of(PROPOSALS), reviewed([top, bottom], [2, 0]), 0.5)
    assert targets.tolist() == [3, 3, 0, 1, 0]


def synthetic_images(count: int, seed: int) -> list[tuple[ImageRecord, np.ndarray]]:
    """Records whose embeddings encode their masks' classes (-1: background), one class each."""
    class_protos, background_protos = prototypes(len(CLASSES), EMBED_DIM, seed=0)
    rng = np.random.default_rng(seed)
    return [
        make_record(
            f"image_{seed}_{index:03d}",
            [index % len(CLASSES)],
            len(CLASSES),
            class_protos,
            background_protos,
            rng,
            masks_per_image=(10, 20),
            foreground_fraction=0.3,
            noise=0.5,
        )
        for index in range(count)
    ]


def review_of(images: list[tuple[ImageRecord, np.ndarray]]) -> Review:
    """What a reviewer draws: every object mask of each image, with its class."""
    reviewed_images = []
    for record, mask_classes in images:
        objects = mask_classes >= 0
        reviewed_images.append(
            ReviewedImage(
                record.key,
                record.height,
                record.width,
                record.masks()[objects],
                mask_classes[objects].astype(np.int64),
            )
        )
    return Review("review.json", tuple(CLASSES), tuple(reviewed_images), ("a skipped region",))


def saved(module: TeacherModule, path: Path) -> Path:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def wrong_head(path: Path) -> Path:
    """A head saved as fit saves one, sure that every mask is a dog."""
    torch.manual_seed(0)
    module = TeacherModule(CLASSES, embed_dim=EMBED_DIM, sam_model_type="tiny")
    module.provenance = Provenance(("synthetic embeddings (no SAM)",))
    with torch.no_grad():
        module.head.layers[-1].bias[CLASSES.index("dog") + 1] = 20.0
    return saved(module, path)


def proposal_accuracy(path: Path, images: list[tuple[ImageRecord, np.ndarray]]) -> float:
    """The share of proposals whose most likely output is their true one (background 0)."""
    head = load_head(path)
    right = total = 0
    for record, mask_classes in images:
        features = select_input_view(
            torch.from_numpy(record.embeddings),
            torch.from_numpy(record.multimask.astype(np.int64)),
            head.metadata.input_view,
        )
        with torch.no_grad():
            predicted = head.head(features).argmax(-1).numpy()
        right += int((predicted == mask_classes + 1).sum())
        total += len(mask_classes)
    return right / total


SETTINGS = FineTuneSettings(max_epochs=15, lr=1e-3, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    head_path = wrong_head(root / "head.ckpt")
    train, held_out = synthetic_images(12, seed=1), synthetic_images(12, seed=2)
    review = review_of(train)
    records = {record.key: record for record, _ in train}
    checkpoint = finetune_head(load_head(head_path), review, records, SETTINGS, root / "out")
    return head_path, checkpoint, review, held_out


def test_a_head_that_starts_wrong_learns_the_reviewed_classes(finetuned):
    head_path, checkpoint, _, held_out = finetuned
    before, after = proposal_accuracy(head_path, held_out), proposal_accuracy(checkpoint, held_out)
    # measured on its 194 proposals: 0.093 before (the dog masks), 1.000 after; a head
    # calling every proposal background would score 0.706
    assert before < 0.15
    assert after > 0.9


def test_the_checkpoint_loads_as_a_head_and_records_the_review(finetuned):
    head_path, checkpoint, review, _ = finetuned
    assert checkpoint.name == "finetune.ckpt" and not checkpoint.with_suffix(".partial").exists()
    head, start = load_head(checkpoint), load_head(head_path)
    assert head.metadata.stage == "FineTuneModule"
    assert head.metadata.review == {
        "source": "review.json",
        "sha256": review.digest(),
        "images": 12,
        "regions": review.regions,
        "skipped": 1,
    }
    assert head.classes == CLASSES and head.sam_model_type == "tiny"
    assert head.metadata.provenance == Provenance(("synthetic embeddings (no SAM)",))
    assert start.metadata.review is None  # a head fit trained records no review


def test_a_checkpoint_written_before_reviews_still_loads(finetuned, tmp_path):
    head_path = finetuned[0]
    checkpoint = torch.load(head_path, weights_only=True)
    del checkpoint["usam"]["review"]
    torch.save(checkpoint, tmp_path / "older.ckpt")
    assert load_head(tmp_path / "older.ckpt").metadata.review is None


def test_the_generated_images_mil_loss_joins_every_step(finetuned, tmp_path):
    head_path, _, review, _ = finetuned
    train = synthetic_images(12, seed=1)
    generated = ShardDataModule(
        CLASSES,
        train_dir=str(tmp_path / "generated" / "train"),
        val_dir=str(tmp_path / "generated" / "val"),
        source="synthetic",
        embed_dim=EMBED_DIM,
        sam_model_type="tiny",
        batch_size=2,
        synthetic={"images_per_class": 4, "masks_per_image": [6, 10]},
    )
    generated.prepare_data()
    generated.setup("fit")
    settings = FineTuneSettings(mil_weight=0.5, max_epochs=1, batch_size=4)
    logger = CSVLogger(tmp_path, name="log")
    records = {record.key: record for record, _ in train}
    out = finetune_head(
        load_head(head_path), review, records, settings, tmp_path, [logger], generated
    )
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    steps = [row for row in rows if row.get("train/loss")]
    # 12 generated images in batches of 2 outnumber 12 reviewed ones in batches of 4
    assert len(steps) == 6
    for row in steps:
        total = float(row["train/reviewed_ce"]) + 0.5 * float(row["train/mil"])
        assert math.isclose(float(row["train/loss"]), total, rel_tol=1e-5)
    assert load_head(out).metadata.provenance == Provenance(
        ("synthetic embeddings (no SAM)", "an untrained SAM (tiny)")
    )


def test_an_image_without_proposals_given_is_refused(finetuned, tmp_path):
    head_path, _, review, _ = finetuned
    with pytest.raises(FineTuneError, match="no SAM proposals given for the reviewed image"):
        finetune_head(load_head(head_path), review, {}, SETTINGS, tmp_path)


def drawn_image(path: Path, shift: int) -> np.ndarray:
    """A 48 x 64 picture of two boxes; returns the mask of the first."""
    image = np.full((48, 64, 3), 40, np.uint8)
    image[8:30, 6 + shift : 30 + shift] = (200, 60, 60)
    image[20:44, 36:60] = (60, 60, 200)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return box(48, 64, slice(8, 30), slice(6 + shift, 30 + shift))


def write_export(root: Path, images: Path) -> Path:
    """A Label Studio JSON export of usam's tasks as a reviewer submitted them: each image's
    box a cat, one image's second region given a class the head lacks, and a task of an
    image that is not in the folder."""
    classes = ["cat", "dog"]
    labelled = []
    for index, name in enumerate(["a.png", "nested/b.png"]):
        first = drawn_image(images / name, shift=4 * index)
        second = box(48, 64, slice(20, 44), slice(36, 60))
        labelled.append(LabelledImage(name, prediction_of(np.stack([first, second]), [0, 1])))
    labelled.append(
        LabelledImage(
            "missing.png", prediction_of(box(48, 64, slice(0, 9), slice(0, 9))[None], [0])
        )
    )
    addresses = ImageAddresses(LabelStudioSettings(document_root=str(root)), images)
    tasks = label_studio_tasks(labelled, classes, addresses, "usam", polygons=False)
    for number, task in enumerate(tasks, start=1):
        task["id"] = number
        task["annotations"] = [{"id": number, "result": task.pop("predictions")[0]["result"]}]
    tasks[1]["annotations"][0]["result"][1]["value"]["brushlabels"] = ["zebra"]
    export = root / "export.json"
    export.write_text(json.dumps(tasks))
    return export


@pytest.fixture(scope="module")
def review_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    images = root / "images"
    export = write_export(root, images)
    head = head_checkpoint(root / "head.ckpt", ["cat", "dog"])
    return root, images, export, head


def finetune_args(head: Path, export: Path, images: Path, *extra: str) -> list[str]:
    return [
        "stage=finetune",
        f"finetune.head_ckpt={head}",
        f"finetune.review={export}",
        f"finetune.images={images}",
        "finetune.max_epochs=2",
        "logger=wandb",
        "paths.output_dir=run",
        *TINY_EXTRACT,
        *extra,
    ]


def test_the_fit_command_fine_tunes_a_head_on_a_label_studio_export(
    review_folder, tmp_path, capsys
):
    root, images, export, head = review_folder
    code, stderr = run_entry("fit", *finetune_args(head, export, images), cwd=tmp_path)
    assert code == 0, stderr
    lines = capsys.readouterr().out.splitlines()
    checkpoint = (tmp_path / "run" / "checkpoints" / "finetune" / "finetune.ckpt").resolve()
    started = lines.index(f"finetune: 2 images, 3 regions from {export}")
    skipped = lines[started - 2 : started]
    assert skipped[0].startswith("task 2 (nested/b.png)") and "zebra" in skipped[0]
    assert skipped[1] == f"missing.png: not in {images}, skipped"
    assert lines[-2] == f"finetune checkpoint: {checkpoint}"
    assert lines[-1] == (
        "  this run's metrics check the pipeline and are NOT results (RANDOM WEIGHTS: "
        "synthetic embeddings (no SAM); an untrained SAM (tiny))"
    )
    tuned = load_head(checkpoint)
    assert tuned.metadata.stage == "FineTuneModule" and tuned.classes == ["cat", "dog"]
    identity = tuned.metadata.review
    assert (identity["source"], identity["images"], identity["regions"]) == (str(export), 2, 3)
    assert identity["skipped"] == 2
    record = offline_record(tmp_path / "run", identity["sha256"].encode())
    for key in ("finetune.review_sha256", "finetune.review_images", "finetune.review_regions"):
        assert key.encode() in record
    assert identity["sha256"].encode() in record


@pytest.mark.parametrize(
    "wrong, line",
    [
        (
            "finetune.head_ckpt=nothing.ckpt",
            "finetune.head_ckpt: checkpoint nothing.ckpt does not exist",
        ),
        (
            "finetune.review=nothing.json",
            "finetune.review=nothing.json is not a file: export the reviewed tasks from Label "
            "Studio (JSON) or CVAT (CVAT for images 1.1) and point finetune.review at the file",
        ),
        ("finetune.match_iou=1.5", "finetune: match_iou=1.5 must be in (0, 1]"),
        (
            "finetune.mil_weight=0.5",  # data.classes is voc20, the head's cat and dog
            "finetune.mil_weight > 0 learns from generated images of data.classes, "
            "['aeroplane', 'bicycle', 'bird', 'boat', 'bottle']..., which are not the head's "
            "['cat', 'dog']...: set data.classes to the head's vocabulary",
        ),
        (
            "finetune.images=nothing",
            "finetune.images=nothing is not a folder: set it to the folder of images that was "
            "annotated (the review names each image by its path under it)",
        ),
    ],
)
def test_a_missing_input_is_one_line_naming_its_key(review_folder, tmp_path, wrong, line):
    root, images, export, head = review_folder
    args = [*finetune_args(head, export, images), wrong]
    code, stderr = run_entry("fit", *args, cwd=tmp_path)
    assert code == 2
    assert stderr.splitlines() == [f"usam.fit: error: {line}"]


def test_with_a_mil_weight_the_command_also_learns_from_generated_images(review_folder, tmp_path):
    root, images, export, head = review_folder
    generated = [
        "finetune.mil_weight=0.5",
        "data=synthetic",
        "data.classes=[cat,dog]",
        "data.synthetic.images_per_class=4",
        "data.batch_size=2",
        "logger=csv",
    ]
    code, stderr = run_entry("fit", *finetune_args(head, export, images), *generated, cwd=tmp_path)
    assert code == 0, stderr
    (metrics,) = (tmp_path / "run").glob("csv/**/metrics.csv")
    steps = [row for row in csv.DictReader(open(metrics)) if row.get("train/loss")]
    # 8 generated images in batches of 2 for each of 2 epochs; 2 reviewed images cycle
    assert len(steps) == 8
    for row in steps:
        total = float(row["train/reviewed_ce"]) + 0.5 * float(row["train/mil"])
        assert math.isclose(float(row["train/loss"]), total, rel_tol=1e-5)


def test_a_review_with_no_usable_image_is_one_line(review_folder, tmp_path, capsys):
    root, images, export, head = review_folder
    only_missing = [json.loads(export.read_text())[-1]]
    (tmp_path / "missing.json").write_text(json.dumps(only_missing))
    args = finetune_args(head, tmp_path / "missing.json", images)
    code, stderr = run_entry("fit", *args, cwd=tmp_path)
    assert code == 2
    assert stderr.splitlines() == [
        f"usam.fit: error: {tmp_path / 'missing.json'}: no reviewed image is usable (the lines "
        "above say why); fix finetune.review or finetune.images"
    ]
    assert capsys.readouterr().out.splitlines()[-2:] == [
        f"missing.png: not in {images}, skipped",
        f"finetune: 0 images, 0 regions from {tmp_path / 'missing.json'}",
    ]


def test_a_student_is_fine_tuned_with_its_teachers_arguments_and_its_own_choices(tmp_path):
    arguments = {
        "classes": CLASSES,
        "input_view": "own_first",
        "embed_dim": EMBED_DIM,
        "sam_model_type": "tiny",
        "head": {"hidden_dims": [16, 8, 4], "dropout": 0.2},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "top_k": 3,
        "background_in_label": False,
    }
    teacher = saved(TeacherModule(**arguments), tmp_path / "teacher.ckpt")
    assert head_arguments(load_head(teacher)) == arguments
    student = StudentModule.from_teacher(str(teacher), top_k=0.25)
    path = saved(student, tmp_path / "student.ckpt")
    assert head_arguments(load_head(path)) == {**arguments, "top_k": 0.25}
