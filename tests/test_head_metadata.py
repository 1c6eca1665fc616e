"""The head metadata record: what fit writes is what eval and annotate read, and checkpoints of
the first layout (a ``random_weights`` flag, the mask settings as a plain dict) still load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from usam.core.provenance import Provenance
from usam.inference.predictor import HeadCheckpointError, load_head
from usam.sam.amg_settings import AmgSettings
from usam.train.head_metadata import LEGACY_REASON, HeadMetadata

from helpers.evaluation import head_checkpoint

AMG = AmgSettings(points_per_side=8, pred_iou_thresh=0.5)


def test_the_record_round_trips_through_a_checkpoint_file(tmp_path):
    path = head_checkpoint(tmp_path / "head.ckpt", ["cat", "dog"], mask_settings=AMG)
    meta = load_head(path).metadata
    assert meta == HeadMetadata(
        classes=("cat", "dog"),
        input_view="tokens",
        stage="TeacherModule",
        sam_model_type="tiny",
        mask_settings=AMG,
        provenance=Provenance(("synthetic embeddings (no SAM)",)),
    )
    stored = torch.load(path, weights_only=True)["usam"]  # plain values only
    assert stored["amg"] == dataclasses.asdict(AMG)
    assert stored["not_meaningful_because"] == ["synthetic embeddings (no SAM)"]


@pytest.mark.parametrize("random", [True, False])
def test_a_checkpoint_of_the_first_layout_still_loads(tmp_path, random):
    path = head_checkpoint(tmp_path / "head.ckpt", ["cat", "dog"])
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["usam"] = {  # as fit wrote it before the record had a format version
        "classes": ["cat", "dog"],
        "input_view": "tokens",
        "sam_model_type": "tiny",
        "random_weights": random,
        "stage": "TeacherModule",
        "amg": first_layout_amg(AMG),
    }
    torch.save(checkpoint, path)
    head = load_head(path)
    assert head.metadata.mask_settings == AMG and head.classes == ["cat", "dog"]
    assert head.metadata.provenance == Provenance((LEGACY_REASON,) if random else ())
    assert head.provenance.random_weights is random


def first_layout_amg(settings) -> dict:
    """Mask settings as the first layout recorded them: the since-retired ``approximate``,
    and none of the keys added after it (the filtered proposals were the only reading)."""
    added = ("proposals", "hq_token_only", "multimask_output")
    recorded = {k: v for k, v in dataclasses.asdict(settings).items() if k not in added}
    return {**recorded, "approximate": False}


def test_masks_of_the_retired_approximate_mode_are_refused_by_name(tmp_path):
    path = head_checkpoint(tmp_path / "head.ckpt", ["cat", "dog"])
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["usam"]["amg"] = {**first_layout_amg(AMG), "approximate": True}
    torch.save(checkpoint, path)
    with pytest.raises(HeadCheckpointError, match=rf"{path} .*amg\.approximate=true.*re-extract"):
        load_head(path)


def test_an_unreadable_record_names_the_file(tmp_path):
    path = head_checkpoint(tmp_path / "head.ckpt", ["cat", "dog"])
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["usam"]["amg"] = {"points_per_sid": 8}
    torch.save(checkpoint, path)
    with pytest.raises(HeadCheckpointError, match=rf"{path} holds usam head metadata .*amg\."):
        load_head(path)
