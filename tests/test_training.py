from __future__ import annotations

import lightning as L
import pytest
import torch

from usam.data.datamodule import ShardDataModule
from usam.data.synthetic import BACKGROUND_PROTOTYPES, prototypes
from usam.train.lightning_modules import StudentModule, TeacherModule

from helpers.shards import SMALL_CLASSES, synthetic_datamodule

HEAD = {"hidden_dims": [64, 32, 32], "dropout": 0.0}


def datamodule_for(shard_sets) -> ShardDataModule:
    return synthetic_datamodule(shard_sets, batch_size=8)


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    args.update(kwargs)
    return L.Trainer(**args)


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
    chance = 1 / len(SMALL_CLASSES)
    assert before["val/image_acc"] < 0.6
    assert after["val/loss"] < 0.7 * before["val/loss"]
    assert after["val/image_acc"] >= 0.9 > chance + 0.5
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
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["usam"]["classes"] == SMALL_CLASSES
    assert checkpoint["usam"]["input_view"] == "tokens"
    assert checkpoint["usam"]["sam_model_type"] == "tiny"
    assert checkpoint["usam"]["random_weights"] is True


def test_student_trains_from_a_frozen_teacher(trained_teacher, shard_sets, tmp_path):
    teacher, *_, path = trained_teacher
    student = StudentModule.from_teacher(str(path), lambda_uncertainty=0.5, entropy_threshold=0.3)
    frozen = {k: v.clone() for k, v in student.teacher.state_dict().items()}
    start = {k: v.clone() for k, v in student.head.state_dict().items()}
    for key, value in teacher.head.state_dict().items():
        torch.testing.assert_close(start[key], value)  # init_from_teacher
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(student, datamodule=datamodule_for(shard_sets))
    for key, value in student.teacher.state_dict().items():
        torch.testing.assert_close(value, frozen[key])
    assert any(not torch.equal(v, start[k]) for k, v in student.head.state_dict().items())
    metrics = trainer.callback_metrics
    assert {"train/mil", "train/uncertainty", "train/bad_fraction"} <= set(metrics)
    assert 0.0 <= float(metrics["train/bad_fraction"]) <= 1.0
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


def test_mask_token_view_trains_a_256_input_head(shard_sets, tmp_path):
    teacher = TeacherModule(SMALL_CLASSES, input_view="mask_token", head=HEAD)
    assert teacher.head.layers[0].in_features == 256
    quiet_trainer(tmp_path, fast_dev_run=True).fit(teacher, datamodule=datamodule_for(shard_sets))
