"""Composing the entry configs and running the commands the way a user does."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from usam.core.config import register_resolvers

from helpers.shards import SMALL_CLASSES

ROOT = Path(__file__).resolve().parents[2]  # the repository
SHARED_DATA = ROOT.parent / "shared" / "data"  # the real subsets, beside a developer's clone


CONF_DIR = ROOT / "src" / "usam" / "conf"


# usam.eval / usam.annotate overrides: tiny random SAM whose masks survive the filters, on CPU
TINY_MASKS = [  # the random tiny SAM, whose masks survive these loosened filters
    "sam=tiny",
    "amg.points_per_side=8",
    "amg.pred_iou_thresh=0",
    "amg.stability_score_thresh=0",
    "amg.proposals=filtered",  # the official filters, loosened below
    "amg.box_nms_thresh=0.95",
]
TINY_EXTRACT = [  # SAM in the command's own process, on the CPU, quietly
    *TINY_MASKS,
    "extract.num_workers=0",
    "extract.trainer.accelerator=cpu",
    "extract.trainer.enable_progress_bar=false",
]
TINY_EVAL = [*TINY_EXTRACT, "device=cpu"]


# usam.fit overrides: class names -> tiny SD images -> shards -> one teacher epoch, on CPU
TINY_TEACHER_FIT = [
    "data=voc",
    "data.classes=[cat,dog]",
    "generate=tiny",
    "amg.pred_iou_thresh=0",
    "extract.num_workers=0",
    "extract.trainer.accelerator=cpu",
    "extract.trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "data.batch_size=2",
    "stage=teacher",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """The entry config ``conf/<name>.yaml`` with Hydra command-line ``overrides``."""
    register_resolvers()
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


def run_python(*args: str, timeout: int = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """A child Python process (DDP launches, CLI runs) with one thread, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def fit_on_backend(tmp_path: Path, *sam: str) -> subprocess.CompletedProcess:
    """``usam.fit`` from class names to a teacher on the SAM that ``sam`` overrides name,
    2 x 2 points, run from ``tmp_path``."""
    return run_python(
        *("-m", "usam.fit", *TINY_TEACHER_FIT, "generate.per_class=2", *sam),
        *("amg.points_per_side=2", "amg.stability_score_thresh=0", "extract.val_fraction=0.3"),
        *("callbacks=none", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"),
        cwd=tmp_path,
    )


def run_entry(command: str, *args: str, cwd: Path) -> tuple[int, str]:
    """``python -m usam.<command> args`` from ``cwd``, in this process (no interpreter to
    start): its exit code and what it wrote to stderr. Hydra's global state and the log
    handlers its run installs are undone afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stderr, previous_cwd, previous_argv = io.StringIO(), Path.cwd(), sys.argv
    sys.argv = [f"usam.{command}", *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(stderr):
            importlib.import_module(f"usam.{command}").main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(previous_cwd)
        sys.argv = previous_argv
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return code, stderr.getvalue()


def wait_for(
    condition: Callable[[], bool],
    what: str,
    *,
    process: subprocess.Popen | None = None,
    output: Callable[[], str] | None = None,
    seconds: float = 600.0,
) -> None:
    """Polls until ``condition()`` holds, so that a test waits for a state, never for the
    clock: ``seconds`` only ends a hang, far above what a loaded machine takes. Fails,
    naming ``what`` (with the tail of ``output()``), when it passes or ``process`` ends first."""
    give_up = time.monotonic() + seconds
    while not condition():
        ended = process is not None and process.poll() is not None
        if ended or time.monotonic() > give_up:
            problem = (
                f"the process ended (exit code {process.returncode}) before {what}"
                if ended
                else f"no sign of {what} in {seconds:.0f} s"
            )
            raise AssertionError(f"{problem}:\n{output()[-3000:] if output else ''}")
        time.sleep(0.02)
