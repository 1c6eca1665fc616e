"""Shared fixtures: offline, single-threaded, and small synthetic shard sets in tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from usam.datamodule import ShardDataModule  # noqa: E402
from usam.synthetic import write_synthetic_shard_set  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SMALL_CLASSES = ["cat", "dog", "car", "boat"]
# usam.eval / usam.annotate overrides: tiny random SAM whose masks survive the filters, on CPU
TINY_EVAL = [
    "sam=tiny",
    "amg.points_per_side=8",
    "amg.pred_iou_thresh=0",
    "amg.stability_score_thresh=0",
    "amg.box_nms_thresh=0.95",
    "extract.num_workers=0",
    "extract.trainer.accelerator=cpu",
    "extract.trainer.enable_progress_bar=false",
    "device=cpu",
]


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """The entry config ``conf/<name>.yaml`` with Hydra command-line ``overrides``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def run_overrides(tmp_path: Path, data_dir: Path, *extra: str) -> list[str]:
    """Overrides for a small fit run on synthetic shards, offline and inside tmp_path."""
    return [
        "data=synthetic",
        "trainer.max_epochs=3",
        f"paths.root_dir={tmp_path}",
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"data.classes=[{','.join(SMALL_CLASSES)}]",
        "data.synthetic.images_per_class=12",
        "data.batch_size=8",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        *extra,
    ]


@pytest.fixture(scope="session")
def shard_sets(tmp_path_factory) -> dict[str, Path]:
    """A train and a val synthetic shard set over SMALL_CLASSES (several shards each)."""
    root = tmp_path_factory.mktemp("shards")
    sets = {}
    for split, per_class in (("train", 24), ("val", 8)):
        sets[split] = root / split
        write_synthetic_shard_set(
            sets[split],
            classes=SMALL_CLASSES,
            split=split,
            images_per_class=per_class,
            masks_per_image=(6, 20),
            images_per_shard=10,
            seed=3,
        )
    return sets


def synthetic_datamodule(shard_sets: dict[str, Path], **kwargs) -> ShardDataModule:
    """A DataModule over the ``shard_sets`` fixture (SMALL_CLASSES, tiny SAM)."""
    args = {
        "classes": SMALL_CLASSES,
        "train_dir": str(shard_sets["train"]),
        "val_dir": str(shard_sets["val"]),
        "source": "synthetic",
        "sam_model_type": "tiny",
        "batch_size": 4,
    }
    return ShardDataModule(**{**args, **kwargs})


def run_python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A child Python process (DDP launches, CLI runs) with one thread, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
