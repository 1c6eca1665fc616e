"""Which mask settings eval and annotate run SAM with: the head's own, unless the user says."""

from __future__ import annotations

import dataclasses

from usam.inference.predictor import HeadCheckpoint
from usam.sam.amg_settings import AmgSettings


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
