"""The SAM 3 baseline with a tiny random SAM 3 built in code on the small VOC set: class names
as bare text prompts, detections at their class column, the command through the shared
metrics path, and the weights errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from usam.core.config import ConfigError, settings_from_config
from usam.data.eval_datasets import VOCSegmentation
from usam.evaluation.sam3_baseline import (
    HUB_URL,
    UNTRAINED,
    Sam3Detector,
    Sam3Predictor,
    Sam3Settings,
    Sam3WeightsError,
    load_sam3,
)
from usam.evaluation.scoring import evaluate
from usam.inference.predictor import InferenceSettings, Predictor, select_instances

from helpers.commands import run_python
from helpers.evaluation import write_voc
from helpers.wandb_runs import offline_record

LOW = ["baseline.sam3.score_threshold=0.2", "inference.confidence_threshold=0.2"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> VOCSegmentation:
    return VOCSegmentation(write_voc(tmp_path_factory.mktemp("sam3") / "VOC2012"), "val")


def test_each_class_name_is_a_bare_prompt_and_its_detections_keep_its_column(voc):
    classes = list(voc.classes)
    dog = classes.index("dog")  # prompts 9-11 share a batch of three: dog is the last
    sam3 = load_sam3(Sam3Settings(model="tiny"), classes)
    prompted = []
    sam3.model.text_encoder.register_forward_hook(
        lambda module, args, kwargs, output: prompted.extend(
            sam3.processor.tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True)
        ),
        with_kwargs=True,
    )
    settings = Sam3Settings(model="tiny", score_threshold=0.5, prompts_per_batch=3)
    detector = Sam3Detector(sam3, classes, settings)
    assert prompted == classes  # "potted plant", not "a photo of a potted plant"

    def only_dog_is_found(module, args, kwargs, output):
        is_dog = (kwargs["text_embeds"].pooler_output == detector.text[dog]).flatten(1).all(1)
        sure = torch.where(is_dog, 20.0, -20.0)[:, None]
        output.pred_logits[:] = sure
        output.presence_logits[:] = sure

    sam3.model.register_forward_hook(only_dog_is_found, with_kwargs=True)
    image = voc.load(0)
    record = detector(image)
    assert record.num_masks == 8  # every query of the dog prompt, none of the others
    assert (record.height, record.width) == (image.image.height, image.image.width)
    assert record.ground_truth == image.ground_truth
    predictor = Sam3Predictor(classes, True, InferenceSettings(confidence_threshold=0.5))
    assert isinstance(predictor, Predictor) and predictor.checkpoint.sam_model_type == "sam3"
    probs = predictor.mask_probabilities(record)
    assert probs.shape == (8, len(classes) + 1)
    np.testing.assert_array_equal(probs[:, 1 + dog], record.iou_preds)
    assert (np.delete(probs, 1 + dog, axis=1) == 0).all() and (probs[:, 1 + dog] > 0.99).all()
    assert (select_instances(record, probs, predictor.settings).labels == dog).all()


def test_command_scores_sam3_detections_with_the_shared_metrics(voc, tmp_path):
    run_dir = tmp_path / "run"
    shown = run_python(
        "-m",
        "usam.eval",
        "baseline=sam3",
        "baseline.sam3.model=tiny",
        f"eval_data.source.root={voc.root}",
        *LOW,
        "sweep.confidence_thresholds=[0.2,0.3]",
        "sweep.nms_ious=[0.5]",
        "num_overlays=1",
        "device=cpu",
        "wandb.enabled=true",
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    record = offline_record(run_dir / "wandb", b"baseline:sam3", b"random-weights")
    assert b"sam:tiny" not in record  # no SAM 1 model took part
    assert "RANDOM WEIGHTS: these numbers check the evaluation pipeline" in shown.stdout
    assert f"because of: {UNTRAINED}" in shown.stdout  # the banner names the untrained SAM 3
    assert "SAM 3" in shown.stderr and "2/2" in shown.stderr  # a bar with its total
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["baseline"] == "sam3" and metrics["sam3"]["model"] == "tiny"
    assert metrics["meaningful"] is False
    assert metrics["not_meaningful_because"] == [
        UNTRAINED,
        "evaluation masks: an untrained SAM (sam3)",  # the detections' manifest says so too
    ]
    assert metrics["images"] == 2 and metrics["detections"] > 0
    assert metrics["shards"] == str(run_dir / "sam3_detections")
    assert not (tmp_path / "data").exists()  # no SAM-1 masks extracted
    predictor = Sam3Predictor(voc.classes, True, InferenceSettings(confidence_threshold=0.2))
    expected = evaluate(run_dir / "sam3_detections", predictor)  # the head's very path
    assert metrics["mIoU"] == pytest.approx(expected.scores["mIoU"])
    assert metrics["mAP50"] == pytest.approx(expected.scores["mAP50"])
    with open(run_dir / "per_class.csv") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 1 + 21 and {row[-1] for row in rows[1:]} == {"True"}
    with open(run_dir / "sweep.csv") as handle:
        assert len(list(csv.reader(handle))) == 1 + 2
    assert len(list((run_dir / "overlays").glob("*.png"))) == 1


def test_missing_weights_stop_at_once_naming_the_key_and_the_hub_page(voc, tmp_path):
    command = [
        sys.executable, "-m", "usam.eval", "baseline=sam3", f"eval_data.source.root={voc.root}",
        "device=cpu", f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    shown = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=offline
    )
    assert shown.returncode == 2
    [line] = shown.stderr.strip().splitlines()
    assert line.startswith("usam.eval: error: SAM 3 weights 'facebook/sam3' could not be loaded")
    for needed in (HUB_URL, "request access", "hf auth login", "baseline.sam3.checkpoint="):
        assert needed in line, needed
    assert not (tmp_path / "run" / "sam3_detections").exists()  # before SAM 3 saw an image
    with pytest.raises(Sam3WeightsError, match="baseline.sam3.checkpoint=.* is not a folder"):
        load_sam3(Sam3Settings(checkpoint=str(tmp_path / "missing")), voc.classes)


def test_a_saved_sam3_folder_loads_through_the_checkpoint_key(tmp_path):
    tiny = load_sam3(Sam3Settings(model="tiny"), ["cat", "dog"])
    tiny.model.save_pretrained(tmp_path / "sam3")
    tiny.processor.save_pretrained(tmp_path / "sam3")
    loaded = load_sam3(Sam3Settings(checkpoint=str(tmp_path / "sam3")), ["x"])
    assert loaded.weights == str(tmp_path / "sam3") and not loaded.random_weights
    for mine, theirs in zip(tiny.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(mine, theirs)
    with pytest.raises(ConfigError, match=r"baseline.sam3.score_threshold=2.0 must be in \[0, 1\]"):
        settings_from_config(Sam3Settings, {"score_threshold": 2.0}, "baseline.sam3")
