"""Evaluation split over DDP ranks (CPU, gloo, started by Lightning's launcher): each rank
scores a disjoint share of the images and the reduced metrics equal the one-process run,
in ``evaluate`` and in ``usam.eval trainer.devices=2``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric import Fabric
from PIL import Image
from pycocotools import mask as mask_utils

from usam.commands.eval import run
from usam.core.config import ConfigError
from usam.core.process_group import leave_process_group
from usam.core.vocabulary import load_vocabulary
from usam.data.datamodule import ShardDataModule
from usam.data.eval_datasets import VOCSegmentation, load_ground_truth
from usam.data.rank_shares import RankShare
from usam.evaluation.callback import EvaluationCallback
from usam.evaluation.scoring import EvaluationError, evaluate
from usam.formats.embedding_shards import (
    Manifest,
    ShardSetWriter,
    iter_records,
    read_manifest,
)
from usam.inference.predictor import InferenceSettings, Predictor
from usam.testing.synthetic import write_synthetic_shard_set
from usam.train.lightning_modules import TeacherModule

from helpers.commands import TINY_EVAL, compose_config, run_python
from helpers.evaluation import FAST, GRID, head_checkpoint, peaky, write_voc
from helpers.shards import record_of_masks

LOW = InferenceSettings(confidence_threshold=0.3, nms_iou=0.5)
TOLERANCE = 1e-6  # float32 sums reduced in another order
# new images from write_voc's two: mirrored and turned, so SAM's masks and scores differ
VARIANTS = {
    "2011_000005": ("2011_000003", Image.Transpose.FLIP_LEFT_RIGHT),
    "2011_000006": ("2011_000004", Image.Transpose.ROTATE_180),
    "2011_000007": ("2011_000003", Image.Transpose.FLIP_TOP_BOTTOM),
}


class HalfOracle(Predictor):
    """The random head's probabilities mixed with the ground-truth class under each mask, so
    that AP has hits to count and no two masks share a score (COCO orders ties by image)."""

    def mask_probabilities(self, record):
        truth = load_ground_truth(record.ground_truth).semantic
        oracle = np.zeros((record.num_masks, len(self.classes) + 1))
        oracle[:, 0] = 1.0
        for index, rle in enumerate(record.coco_rles()):
            under = truth[mask_utils.decode(rle).astype(bool)]
            under = under[(under > 0) & (under < 255)]
            if under.size:
                label = np.bincount(under).argmax()
                share = (under == label).sum() / under.size
                oracle[index, [0, label]] = 1 - share, share
        return 0.7 * oracle + 0.3 * super().mask_probabilities(record)


def write_five_image_voc(root: Path) -> Path:
    """write_voc's two images and three variants: an uneven share on 2 and 3 ranks."""
    write_voc(root)
    for key, (original, turn) in VARIANTS.items():
        for folder, suffix in (
            ("JPEGImages", "jpg"),
            ("SegmentationClass", "png"),
            ("SegmentationObject", "png"),
        ):
            path = root / folder / f"{original}.{suffix}"
            if path.exists():
                with Image.open(path) as image:
                    image.transpose(turn).save(root / folder / f"{key}.{suffix}", quality=95)
    lists = root / "ImageSets" / "Segmentation" / "val.txt"
    lists.write_text(lists.read_text() + "\n".join(VARIANTS) + "\n")
    return root


def near_truth_set(source: VOCSegmentation, directory: Path) -> Path:
    """An eval shard set (2 images a shard: 3 shards) whose masks are each ground-truth
    instance and a shifted copy of it, so that AP counts both hits and misses."""
    manifest = Manifest(list(source.classes), 1024, "eval", {"model_type": "tiny"})
    rng = np.random.default_rng(0)
    with ShardSetWriter(directory, manifest, images_per_shard=2) as writer:
        for image in source:
            truth = load_ground_truth(image.ground_truth)
            masks = [m for i in truth.instances for m in (i.mask, np.roll(i.mask, (4, 7), (0, 1)))]
            shape = truth.semantic.shape
            writer.write(record_of_masks(image.key, masks, shape, image.ground_truth, rng))
    return directory


@pytest.fixture(scope="module")
def five_images(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The set's VOC folder, an eval shard set of it and a head."""
    root = tmp_path_factory.mktemp("ranks")
    voc = write_five_image_voc(root / "VOC2012")
    shards = near_truth_set(VOCSegmentation(voc, "val"), root / "shards" / "eval")
    return voc, shards, head_checkpoint(root / "head.ckpt")


def score_rank(fabric: Fabric, shards: Path, ckpt: Path, out: Path) -> None:
    """One rank: its evaluation's scores, sweep, counts and the images it scored."""
    predictor = HalfOracle.from_checkpoint(ckpt, LOW, "cpu")
    share = RankShare(fabric.global_rank, fabric.world_size)
    evaluation = evaluate(shards, predictor, sweep=GRID, num_samples=2, share=share)
    result = {
        "scores": evaluation.scores,
        "sweep": [point.row() for point in evaluation.sweep],
        "counts": [evaluation.images, evaluation.masks, evaluation.detections],
        "keys": evaluation.keys,
        "samples": [sample.key for sample in evaluation.samples],
    }
    (out / f"rank{fabric.global_rank}.json").write_text(json.dumps(result))
    leave_process_group()


def assert_close(split: dict[str, float], alone: dict[str, float]) -> None:
    assert split.keys() == alone.keys()
    for name, value in alone.items():
        if math.isnan(value):
            assert math.isnan(split[name]), name
        else:
            assert split[name] == pytest.approx(value, abs=TOLERANCE, rel=0), name


@pytest.mark.parametrize("ranks", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_ranks_score_disjoint_shares_that_reduce_to_the_one_process_scores(
    five_images, tmp_path, ranks
):
    _, shards, ckpt = five_images
    alone = evaluate(shards, HalfOracle.from_checkpoint(ckpt, LOW, "cpu"), sweep=GRID)
    assert alone.images == 5 and alone.detections > 0
    assert alone.scores["mAP50"] > 0.1 and alone.scores["mIoU"] > 10  # hits to reduce

    Fabric(accelerator="cpu", devices=ranks, strategy="ddp_spawn").launch(
        score_rank, shards, ckpt, tmp_path
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    every_key = [record.key for record in iter_records(shards)]
    shares = [result["keys"] for result in results]
    assert all(shares) and sorted(key for share in shares for key in share) == sorted(every_key)
    assert len({key for share in shares for key in share}) == len(every_key)  # disjoint
    assert any(len(share) != len(shares[0]) for share in shares)  # uneven shares reduce too
    for result in results:  # every rank ends with the whole set's scores
        assert_close(result["scores"], alone.scores)
        assert result["counts"] == [alone.images, alone.masks, alone.detections]
        for point, expected in zip(result["sweep"], alone.sweep, strict=True):
            assert point == pytest.approx(expected.row(), abs=TOLERANCE, rel=0)
    assert results[0]["samples"] == [shares[0][0], shares[0][-1]]  # rank zero's own images
    assert all(not result["samples"] for result in results[1:])


def test_more_ranks_than_images_is_refused_before_any_rank_waits(five_images):
    _, shards, ckpt = five_images
    predictor = Predictor.from_checkpoint(ckpt, LOW, "cpu")
    with pytest.raises(EvaluationError, match="5 images for 6 ranks"):
        evaluate(shards, predictor, share=RankShare(0, 6))


@pytest.mark.slow
def test_eval_on_two_ranks_writes_the_metrics_of_one_process(five_images, tmp_path):
    """The command's own launch: one shard of 5 images, which each rank reads keeping every
    other image."""
    voc, _, ckpt = five_images
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        result = run_python(
            *("-m", "usam.eval", *TINY_EVAL, f"eval_data.source.root={voc}", f"ckpt={ckpt}"),
            *("inference.confidence_threshold=0.3", "sweep.confidence_thresholds=[0.2,0.5]"),
            *("sweep.nms_ious=[0.5]", "num_overlays=2", f"paths.root_dir={tmp_path}"),
            *(f"paths.output_dir={out}", f"trainer.devices={devices}", "trainer.accelerator=cpu"),
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[devices] = json.loads((out / "metrics.json").read_text())
        assert len(list((out / "overlays").iterdir())) == 2
    alone, split = runs[1], runs[2]
    assert read_manifest(Path(alone["shards"])).shards and alone["images"] == 5
    assert split.keys() == alone.keys()
    for name, value in alone.items():
        if name == "per_class":
            for mine, theirs in zip(split[name], value, strict=True):
                assert mine.keys() == theirs.keys() and mine["name"] == theirs["name"]
                for column in theirs.keys() - {"name"}:
                    assert (mine[column] is None) == (theirs[column] is None)
                    if theirs[column] is not None:
                        assert mine[column] == pytest.approx(theirs[column], abs=TOLERANCE)
        elif name == "threshold_sweep":
            for mine, theirs in zip(split[name]["points"], value["points"], strict=True):
                assert mine == pytest.approx(theirs, abs=TOLERANCE, rel=0)
        elif isinstance(value, float):
            assert split[name] == pytest.approx(value, abs=TOLERANCE, rel=0), name
        else:
            assert split[name] == value, name


@pytest.mark.parametrize(("devices", "shown"), [("0", "0"), ("two", "'two'")])
def test_a_rank_count_that_is_no_whole_number_is_refused_before_extraction(
    five_images, tmp_path, devices, shown
):
    voc, _, ckpt = five_images
    overrides = [*TINY_EVAL, f"eval_data.source.root={voc}", f"ckpt={ckpt}"]
    overrides += [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}"]
    cfg = compose_config("eval", [*overrides, f"trainer.devices={devices}"])
    with pytest.raises(ConfigError, match=f"trainer.devices={shown} must"):
        run(cfg)
    assert not list(tmp_path.rglob("manifest.json"))  # nothing extracted


def test_the_callback_on_two_ranks_logs_the_one_process_scores(five_images, tmp_path):
    """``Trainer.validate`` with the callback on 2 spawned ranks and on one process: the
    same ``val/*`` scores, each rank scoring a share and reducing."""
    voc, shards, _ = five_images
    for split in ("train", "val"):
        write_synthetic_shard_set(
            tmp_path / split, classes="voc20", split=split, images_per_class=1, seed=1
        )
    torch.manual_seed(0)
    module = peaky(TeacherModule(list(load_vocabulary("voc20").classes), sam_model_type="tiny"))
    logged = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        callback = EvaluationCallback(
            shards,
            VOCSegmentation(voc, "val"),
            inference=LOW,
            num_overlays=0,
            output_dir=tmp_path / f"eval{devices}",
        )
        trainer = L.Trainer(
            callbacks=[callback], logger=False, devices=devices, strategy=strategy, **FAST
        )
        datamodule = ShardDataModule(  # a fresh one: a spawned rank takes it unset
            "voc20",
            str(tmp_path / "train"),
            str(tmp_path / "val"),
            source="synthetic",
            sam_model_type="tiny",
            batch_size=4,
        )
        trainer.validate(module, datamodule=datamodule)
        scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k != "val/loss"}
        logged[devices] = scores
    assert {"val/mIoU", "val/mAP50", "val/mAP50-95", "val/iou/person"} <= logged[1].keys()
    assert_close(logged[2], logged[1])
    written = [json.loads(p.read_text()) for p in tmp_path.glob("eval*/val-*/metrics.json")]
    assert len(written) == 2 and written[0]["images"] == written[1]["images"] == 5
