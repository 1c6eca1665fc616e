"""Known third-party chatter, silenced where a command expects it (``verbose=true`` keeps it):
deprecation notes of our pinned libraries, Lightning's tips and device lines, Hugging Face
loading bars, W&B's login notes and its warning about the ``anonymous`` setting Lightning
passes, open_clip's loading lines. Warnings that say something about the run stay."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

EXPECTED_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # lightning 2.6 on torch 2.14
    r"Found \d+ module\(s\) in eval mode",  # the frozen teacher and SAM are meant to be
    r".*does not have many workers",  # loader workers are a config choice, set per machine
    r".*smaller than the logging interval",  # small demo epochs: their metrics are still logged
    r".*`accelerate` was not found",  # diffusers' suggestion to install it
    r"`torch.jit.script` is deprecated",  # sam2 1.1.0 scripts a helper at import
)
CHATTY_LOGGERS = {
    "lightning.pytorch.utilities.rank_zero": logging.WARNING,  # "GPU available", tips
    "lightning.fabric.utilities.rank_zero": logging.WARNING,
    "lightning.fabric.utilities.seed": logging.WARNING,  # the seed is in the run's config
    "diffusers": logging.ERROR,
    "transformers": logging.ERROR,
    "huggingface_hub": logging.ERROR,
}
QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "WANDB_SILENT": "true",
}
# open_clip warnings that the run already reports: random CLIP weights are in its provenance
EXPECTED_OPEN_CLIP_WARNINGS = re.compile(r"No pretrained weights loaded for model")


class OpenClipChatter(logging.Filter):
    """open_clip logs on the root logger (``[root]`` on the console), so its records are told
    apart by the file they come from: its info lines go, its unexpected warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "open_clip" not in Path(record.pathname).parts:
            return True
        expected = EXPECTED_OPEN_CLIP_WARNINGS.search(record.getMessage())
        return record.levelno >= logging.WARNING and not expected


class _WandbLinesToDebug:
    """Where W&B's silent mode sends its terminal lines: the ``wandb.terminal`` logger at
    debug level. wandb 0.18 (the oldest supported) calls it for every warning, so None
    there crashed ``wandb.init`` (Lightning passes ``resume``, which an offline run
    warns about)."""

    def __init__(self) -> None:
        self.log = logging.getLogger("wandb.terminal")

    def info(self, line: str) -> None:
        self.log.debug(line)

    warning = error = info


def _silence_wandb_terminal(wandb: ModuleType) -> None:
    """W&B prints to the terminal unless set up silent, and Lightning's logger builds its
    settings (with ``anonymous``, which W&B warns about) before W&B reads WANDB_SILENT."""
    if os.environ.get("WANDB_SILENT", "").lower() == "true":
        wandb.termsetup(wandb.Settings(silent=True), _WandbLinesToDebug())


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``configure`` with a module once it is imported, so that quieting a library
    costs nothing in a command that never imports it. Every search for the module is
    answered (a ``find_spec`` that only asks whether it is installed imports nothing)."""

    def __init__(self, name: str, configure: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.configure = configure
        self._searching = False

    def find_spec(self, fullname: str, path: object, target: object = None) -> object:
        if fullname != self.name or self._searching:
            return None
        self._searching = True  # the search below goes to the finders after this one
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching = False
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module: ModuleType) -> None:
                load(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                self.configure(module)

            spec.loader.exec_module = exec_module
        return spec


def after_import(name: str, configure: Callable[[ModuleType], None]) -> None:
    """``configure(module)`` now if ``name`` is imported, else right after its import."""
    if name in sys.modules:
        configure(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, configure))


def quiet_third_party() -> None:
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, level in CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    root = logging.getLogger()
    if not any(isinstance(f, OpenClipChatter) for f in root.filters):
        root.addFilter(OpenClipChatter())
    after_import("wandb", _silence_wandb_terminal)
