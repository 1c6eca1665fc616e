"""Which mask settings eval, annotate and serve run SAM with: the head's own, unless the
user says; and the annotator a command's config describes."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig

from usam.cli import command_line_sets
from usam.core.config import settings_from_config
from usam.core.devices import resolve_device
from usam.inference.annotator import Annotator
from usam.inference.predictor import HeadCheckpoint, InferenceSettings, Predictor, load_head
from usam.sam.amg_settings import AmgSettings
from usam.sam.registry import SamSettings


def head_mask_settings(
    configured: AmgSettings, head: HeadCheckpoint, command_line_sets_amg: bool
) -> AmgSettings:
    """The mask settings of the head's training shards, unless the command line sets ``amg``
    (then ``configured``): masks made another way are inputs the head never saw; those of
    another precision are refused before any work. Prints which were used."""
    recorded = head.metadata.mask_settings
    if recorded is not None and not command_line_sets_amg:
        amg, origin = recorded, f"recorded in {head.path}"
    else:
        amg = configured
        origin = "from the amg config" + (" (the head records none)" if recorded is None else "")
    head.check_precision(amg.precision)
    shown = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(amg).items())
    print(f"mask settings {origin}: {shown}")
    return amg


def configured_annotator(cfg: DictConfig) -> Annotator:
    """The head of ``cfg.ckpt`` on ``cfg.device`` with ``cfg.inference``, and the SAM of
    ``cfg.sam`` making masks as :func:`head_mask_settings` decides."""
    sam = settings_from_config(SamSettings, cfg.sam, "sam")
    inference = settings_from_config(InferenceSettings, cfg.inference, "inference")
    configured = settings_from_config(AmgSettings, cfg.amg, "amg")
    head = load_head(cfg.ckpt)
    amg = head_mask_settings(configured, head, command_line_sets("amg"))
    predictor = Predictor(head, inference, resolve_device(cfg.device, "device"))
    return Annotator(predictor, sam, amg=amg)
