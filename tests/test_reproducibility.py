"""The same seed gives the same numbers: a run whose images and shards were just built and
one that reads them from the cache log the same metrics, so a sweep's first job compares
with the rest."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from usam.testing.tiny_diffusion import build_tiny_pipeline

from helpers.commands import TINY_TEACHER_FIT, run_python

# class names -> tiny SD images -> tiny SAM shards -> teacher -> student, two epochs each
TINY_BOTH_STAGES = [
    *TINY_TEACHER_FIT,
    "generate.per_class=2",
    "sam=tiny",
    "amg.points_per_side=4",
    "extract.val_fraction=0.3",
    "stage=both",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks=none",
]


def _fit(tmp_path: Path, run: str, *extra: str) -> dict[str, dict[str, list[float]]]:
    """``usam.fit`` from ``tmp_path`` into ``run``: every logged metric of each stage, in
    the order it was logged, read from the csv logger's metrics.csv."""
    result = run_python(
        *("-m", "usam.fit", *TINY_BOTH_STAGES, *extra),
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / run}",
        f"paths.cache_dir={tmp_path / 'cache'}",  # the first run builds the tiny generator too
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = {}
    for stage in ("teacher", "student"):
        metrics_csv = tmp_path / run / "csv" / stage / "version_0" / "metrics.csv"
        with metrics_csv.open() as handle:
            rows = list(csv.DictReader(handle))
        names = [name for name in rows[0] if name not in ("epoch", "step")]
        logged[stage] = {
            name: [float(row[name]) for row in rows if row[name] != ""] for name in names
        }
    return logged


def _assert_close(first: dict, second: dict) -> None:
    for stage in ("teacher", "student"):
        assert first[stage].keys() == second[stage].keys()
        for name, values in first[stage].items():
            assert values, (stage, name)
            np.testing.assert_allclose(
                second[stage][name], values, rtol=1e-5, atol=1e-7, err_msg=f"{stage} {name}"
            )


@pytest.mark.slow
def test_a_run_on_cached_data_logs_what_the_run_that_built_it_logged(tmp_path):
    built = _fit(tmp_path, "built")
    assert len(list((tmp_path / "data" / "shards").iterdir())) == 1
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.tar"))
    cached = _fit(tmp_path, "cached")
    assert stamps == sorted(p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.tar"))
    for stage in ("teacher", "student"):
        assert {"train/loss", "val/loss", "val/image_acc", "test/loss"} <= built[stage].keys()
    _assert_close(built, cached)

    reseeded = _fit(tmp_path, "reseeded", "seed=7")
    for stage in ("teacher", "student"):
        losses = built[stage]["train/loss"]
        assert not np.allclose(reseeded[stage]["train/loss"], losses, rtol=1e-3), stage


def test_building_the_tiny_image_generator_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    first = build_tiny_pipeline(seed=1)
    assert torch.equal(torch.rand(4), expected)
    second = build_tiny_pipeline(seed=1)
    for (name, weight), (_, again) in zip(
        first.unet.state_dict().items(), second.unet.state_dict().items(), strict=True
    ):
        assert torch.equal(weight, again), name  # its own seed still fixes its weights
