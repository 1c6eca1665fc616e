"""The paper experiments run the paper's reading by default; ours stays one override away."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator

from usam.core.config import settings_from_config
from usam.inference.predictor import InferenceSettings
from usam.sam.amg_settings import AmgSettings
from usam.train.lightning_modules import build_optimizer

from helpers.commands import compose_config

PAPER_EXPERIMENTS = ["voc_sd", "voc_wc", "coco_sd", "coco_wc", "voc_superclasses"]


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_paper_experiments_default_to_the_papers_reading(experiment):
    cfg = compose_config("fit", [f"experiment={experiment}"])
    amg = settings_from_config(AmgSettings, cfg.amg, "amg")
    assert amg.proposals == "one_per_point" and amg.points_per_side == 32
    assert cfg.model.input_view == "tokens" and cfg.data.embed_dim == 1024
    assert cfg.model.optimizer.name == "adam" and cfg.model.optimizer.weight_decay == 0.0
    inference = settings_from_config(InferenceSettings, cfg.inference, "inference")
    assert inference.confidence_threshold == 0.7
    assert cfg.generate.per_class == 200 and cfg.generate.model == "CompVis/stable-diffusion-v1-4"


def test_the_filtered_pipeline_is_one_override_away():
    """With ``proposals=official_filtered`` every setting the official generator has is its
    own default, read from its signature."""
    cfg = compose_config("fit", ["experiment=voc_sd", "proposals=official_filtered"])
    amg = dataclasses.asdict(settings_from_config(AmgSettings, cfg.amg, "amg"))
    parameters = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    official = {k: p.default for k, p in parameters.items() if p.default is not p.empty}
    usam_only = set(amg) - set(official)  # exactly what usam keeps from the official generator
    assert usam_only == set(amg) - set(AmgSettings().as_kwargs())
    assert {"proposals", "hq_token_only", "multimask_output"} <= usam_only
    assert set(official) - set(amg) == {"point_grids", "output_mode"}  # set by the engine
    assert {key: amg[key] for key in official.keys() & amg.keys()} == {
        key: official[key] for key in official.keys() & amg.keys()
    }
    assert amg["proposals"] == "filtered" and amg["multimask_output"] is True
    assert dataclasses.asdict(AmgSettings()) == amg  # the dataclass keeps those defaults too
    assert cfg.model.input_view == "own_first"


def test_extraction_and_fit_make_the_same_shards_by_default():
    """usam.extract then usam.fit reuse one cached shard set only if their amg agree."""
    fit = compose_config("fit", ["experiment=voc_sd"]).amg
    for command in ("extract", "eval", "annotate"):
        assert compose_config(command, []).amg == fit


def test_sam_clip_keeps_masks_at_the_same_threshold_as_usam():
    head = compose_config("eval", []).inference.confidence_threshold
    clip = compose_config("eval", ["baseline=sam_clip"]).inference.confidence_threshold
    assert head == clip == 0.7


def test_the_optimiser_is_chosen_by_config():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(build_optimizer(params, lr=1e-3)) is torch.optim.Adam
    adamw = build_optimizer(params, name="adamw", lr=1e-3, weight_decay=1e-4)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match="model.optimizer.name='sgd'"):
        build_optimizer(params, name="sgd", lr=1e-3)


@pytest.mark.parametrize(("name", "split"), [("coco_val", "val2017"), ("coco_val2014", "val2014")])
def test_both_coco_validation_splits_are_one_option_each(tmp_path, name, split):
    cfg = compose_config("eval", [f"eval_data={name}", f"paths.data_dir={tmp_path}"])
    source = cfg.eval_data.source
    assert source.image_dir.endswith(f"coco/{split}")
    assert source.annotation_file.endswith(f"instances_{split}.json")
    (tmp_path / "coco" / split).mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(tmp_path / "coco" / split / "1.jpg")
    Path(source.annotation_file).parent.mkdir(parents=True, exist_ok=True)
    Path(source.annotation_file).write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg", "width": 8, "height": 6}],
        "categories": [{"id": i + 1, "name": f"class{i}"} for i in range(80)],
        "annotations": [],
    }))  # fmt: skip
    dataset = instantiate(source)
    assert dataset.keys == ("1",) and len(dataset.classes) == 80
