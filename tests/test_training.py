from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from usam.data.datamodule import ShardDataModule
from usam.formats.embedding_shards import iter_records
from usam.inference.predictor import load_head
from usam.testing.synthetic import BACKGROUND_PROTOTYPES, prototypes
from usam.train.head import select_input_view
from usam.train.lightning_modules import StudentModule, TeacherModule

from helpers.commands import compose_config
from helpers.shards import SMALL_CLASSES, quiet_trainer, synthetic_datamodule

HEAD = {"hidden_dims": [64, 32, 32], "dropout": 0.0}


def datamodule_for(shard_sets) -> ShardDataModule:
    return synthetic_datamodule(shard_sets, batch_size=8)


@pytest.fixture(scope="module")
def trained_teacher(shard_sets, tmp_path_factory):
    L.seed_everything(0)
    tmp_path = tmp_path_factory.mktemp("teacher")
    datamodule = datamodule_for(shard_sets)
    teacher = TeacherModule(SMALL_CLASSES, head=HEAD, top_k=0.25, sam_model_type="tiny")
    trainer = quiet_trainer(tmp_path, max_epochs=8)
    before = trainer.validate(teacher, datamodule=datamodule, verbose=False)[0]
    trainer.fit(teacher, datamodule=datamodule)
    after = trainer.validate(teacher, datamodule=datamodule, verbose=False)[0]
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return teacher, before, after, path


def test_teacher_learns_a_separable_problem(trained_teacher):
    teacher, before, after, _ = trained_teacher
    assert before["val/image_acc"] < 0.6
    assert after["val/loss"] < 0.7 * before["val/loss"]
    assert after["val/image_acc"] >= 0.9  # chance: 1 / 4
    assert after["val/random_weights"] == 1.0
    assert teacher.trainer.progress_bar_metrics["val/random_weights"] == 1.0  # beside the losses
    # masks, not just images: class prototypes map to their class, background ones to 0
    class_protos, background_protos = prototypes(len(SMALL_CLASSES), 1024, seed=3)
    teacher.eval()
    with torch.no_grad():
        embeddings = torch.from_numpy(class_protos).to(torch.float16)
        predicted = teacher(embeddings, torch.zeros(len(SMALL_CLASSES))).argmax(-1)
        assert predicted.tolist() == [i + 1 for i in range(len(SMALL_CLASSES))]
        embeddings = torch.from_numpy(background_protos).to(torch.float16)
        background = teacher(embeddings, torch.zeros(BACKGROUND_PROTOTYPES)).argmax(-1)
        assert (background == 0).float().mean() >= 0.75


def test_teacher_checkpoint_carries_what_inference_needs(trained_teacher):
    *_, path = trained_teacher
    meta = load_head(path).metadata
    assert meta.classes == tuple(SMALL_CLASSES) and meta.stage == "TeacherModule"
    assert meta.input_view == "tokens" and meta.sam_model_type == "tiny"
    assert meta.provenance.random_weights


def test_student_head_starts_untrained_unless_told_to_copy_the_teacher(trained_teacher):
    teacher, *_, path = trained_teacher
    student_cfg = compose_config("fit", []).model.student
    assert student_cfg.init_from_teacher is False  # the paper: an untrained classifier
    fresh = instantiate(student_cfg, teacher_checkpoint=str(path))
    copied = instantiate(student_cfg, teacher_checkpoint=str(path), init_from_teacher=True)
    assert isinstance(fresh, StudentModule)
    for key, value in teacher.head.state_dict().items():
        assert not torch.equal(fresh.head.state_dict()[key], value)
        torch.testing.assert_close(copied.head.state_dict()[key], value)
        torch.testing.assert_close(fresh.teacher.head.state_dict()[key], value)


class LastBatch(L.Callback):
    """Keeps the last training batch, whose values the step logs last."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.batch = batch


def bad_fraction_bounds(student, batch, entropy_threshold: float) -> tuple[float, float]:
    """The share of a batch's valid masks that the frozen teacher is unsure of (normalised
    entropy above the threshold) or sure of a class the image lacks, in float64; a mask
    within 1e-5 of the threshold (float32 rounding) may count either way."""
    with torch.no_grad():
        logits = student.teacher(batch["embeddings"], batch["multimask"]).double()
    probs = logits.softmax(-1).numpy()
    entropy = -(probs * np.log(np.clip(probs, 1e-300, None))).sum(-1) / np.log(probs.shape[-1])
    labels = batch["labels"].numpy().astype(bool)
    allowed = np.concatenate([np.ones((len(labels), 1), bool), labels], 1)
    wrong = ~np.take_along_axis(allowed, probs.argmax(-1), 1)
    valid = batch["valid"].numpy().astype(bool)
    surely_bad = valid & (wrong | (entropy > entropy_threshold + 1e-5))
    maybe_bad = valid & (wrong | (entropy > entropy_threshold - 1e-5))
    return surely_bad.sum() / valid.sum(), maybe_bad.sum() / valid.sum()


def test_student_trains_from_a_frozen_teacher(trained_teacher, shard_sets, tmp_path):
    teacher, *_, path = trained_teacher
    student = StudentModule.from_teacher(str(path), lambda_uncertainty=0.5, entropy_threshold=0.3)
    frozen = {k: v.clone() for k, v in student.teacher.state_dict().items()}
    start = {k: v.clone() for k, v in student.head.state_dict().items()}
    last = LastBatch()
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[last])
    trainer.fit(student, datamodule=datamodule_for(shard_sets))
    for key, value in student.teacher.state_dict().items():
        torch.testing.assert_close(value, frozen[key])
    assert any(not torch.equal(v, start[k]) for k, v in student.head.state_dict().items())
    metrics = trainer.callback_metrics
    assert {"train/mil", "train/uncertainty", "train/bad_fraction"} <= set(metrics)
    low, high = bad_fraction_bounds(student, last.batch, entropy_threshold=0.3)
    assert low - 1e-6 <= float(metrics["train/bad_fraction"]) <= high + 1e-6  # a float32 ratio
    # the student checkpoint stands alone: reloading needs no teacher file
    saved = tmp_path / "student.ckpt"
    trainer.save_checkpoint(saved)
    path.rename(path.with_suffix(".moved"))
    try:
        reloaded = StudentModule.load_from_checkpoint(saved, map_location="cpu")
    finally:
        path.with_suffix(".moved").rename(path)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)
    assert reloaded.lambda_uncertainty == 0.5 and reloaded.entropy_threshold == 0.3


@pytest.mark.parametrize(("view", "width"), [("own_first", 1280), ("mask_token", 256)])
def test_the_other_views_train_their_own_input_widths(shard_sets, tmp_path, view, width):
    teacher = TeacherModule(SMALL_CLASSES, input_view=view, head=HEAD)
    assert teacher.head.layers[0].in_features == width
    quiet_trainer(tmp_path, fast_dev_run=True).fit(teacher, datamodule=datamodule_for(shard_sets))


def test_masks_of_one_sam_point_get_their_own_input_with_filtered_proposals(voc_set):
    """Real tiny-SAM extraction: the up to 3 masks of a point share its 4 stored tokens."""
    _, directory = voc_set
    default_view = compose_config("fit", ["proposals=official_filtered"]).model.input_view
    assert default_view == "own_first"
    siblings = []
    for record in iter_records(directory):
        for point in np.unique(record.points, axis=0):
            rows = np.flatnonzero((record.points == point).all(1))
            if len(np.unique(record.multimask[rows])) > 1:
                siblings.append((record, rows))
    assert siblings, "the tiny SAM kept no point with two of its masks; loosen the AMG filters"
    teacher = TeacherModule(SMALL_CLASSES, input_view=default_view, head=HEAD).eval()
    assert teacher.input_view == default_view and teacher.head.layers[0].in_features == 1280
    for record, rows in siblings:
        embeddings = torch.from_numpy(record.embeddings[rows])
        multimask = torch.from_numpy(record.multimask[rows].astype(np.int64))
        shared = select_input_view(embeddings, multimask, "tokens")
        assert (shared == shared[:1]).all()  # one input, so one prediction, for the whole point
        own = select_input_view(embeddings, multimask, default_view)
        for i, j in zip(*np.triu_indices(len(rows), k=1)):
            if multimask[i] != multimask[j]:
                assert not torch.equal(own[i], own[j])
        with torch.no_grad():
            logits = teacher(embeddings, multimask)
        assert len({tuple(row.tolist()) for row in logits}) == len(set(multimask.tolist()))
