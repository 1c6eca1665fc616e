"""Known third-party chatter, silenced where a command expects it (``verbose=true`` keeps it):
deprecation notes of our pinned libraries, Lightning's tips and device lines, Hugging Face
loading bars, W&B's login notes. Warnings that say something about the run stay."""

from __future__ import annotations

import logging
import os
import warnings

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


def quiet_third_party() -> None:
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, level in CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
