from __future__ import annotations

import json

import lightning as L
import pytest

from usam.train.lightning_modules import TeacherModule

from helpers.commands import ROOT, run_python
from helpers.shards import synthetic_datamodule


def test_two_cpu_ranks_get_disjoint_equal_batches_and_reduced_metrics(shard_sets, tmp_path):
    result = run_python(
        str(ROOT / "tests" / "ddp_probe.py"), str(shard_sets["train"].parent), str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["epochs"]) == len(ranks[1]["epochs"]) == 2
    for epoch in range(2):
        batches = [rank["epochs"][epoch] for rank in ranks]
        assert len(batches[0]) == len(batches[1]) > 0  # in step: same number of batches
        assert [len(b) for b in batches[0]] == [len(b) for b in batches[1]]
        keys = [{key for batch in rank_batches for key in batch} for rank_batches in batches]
        assert not keys[0] & keys[1]  # disjoint images
    # validation metrics are reduced over both ranks' images: equal on every rank and
    # equal to one process validating the same head on the whole validation set
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    module = TeacherModule.load_from_checkpoint(tmp_path / "head.ckpt")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    single = trainer.validate(module, datamodule=synthetic_datamodule(shard_sets), verbose=False)
    for name in ("val/loss", "val/image_acc"):
        assert ranks[0]["metrics"][name] == pytest.approx(single[0][name], rel=1e-5)
