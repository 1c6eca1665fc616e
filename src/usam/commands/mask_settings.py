"""Which mask settings eval and annotate run SAM with: the head's own, unless the user says."""

from __future__ import annotations

import dataclasses

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from usam.core.config import settings_from_config
from usam.inference.predictor import HeadCheckpoint
from usam.sam.amg_settings import AmgSettings


def command_line_sets(group: str) -> bool:
    """Whether the command line overrides config group ``group`` or one of its keys."""
    if not HydraConfig.initialized():
        return False
    keys = (o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task)
    return any(key == group or key.startswith(f"{group}.") for key in keys)


def head_mask_settings(cfg: DictConfig, head: HeadCheckpoint) -> AmgSettings:
    """The mask settings of the head's training shards, unless the command line sets ``amg``:
    masks made another way are inputs the head never saw. Prints which were used."""
    if head.mask_settings and not command_line_sets("amg"):
        amg = settings_from_config(AmgSettings, head.mask_settings, "amg")
        origin = f"recorded in {head.path}"
    else:
        amg = settings_from_config(AmgSettings, cfg.amg, "amg")
        origin = "from the amg config" + (
            " (the head records none)" if not head.mask_settings else ""
        )
    shown = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(amg).items())
    print(f"mask settings {origin}: {shown}")
    return amg
