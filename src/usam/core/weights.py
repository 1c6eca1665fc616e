"""The one way usam reads a checkpoint file: torch's weights-only unpickler, always.

A checkpoint is a pickle, and a pickle can run code. Passing ``weights_only=True``
explicitly keeps torch's restricted unpickler on even where the environment says
otherwise (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` only changes loads that leave it
unset), and refusing URLs keeps loaders that fetch and unpickle on their own out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from usam.core.errors import UsageError


class WeightsFileError(UsageError):
    """A checkpoint that is missing, remote or not a readable weights file."""


def load_weights(
    path: str | Path, config_key: str, error: type[Exception] = WeightsFileError
) -> Any:
    """The contents of a local checkpoint; ``config_key`` names the setting that chose it,
    ``error`` is what the caller's users know to catch."""
    if "://" in str(path):
        raise error(f"{config_key}={path} is a URL: download it, set {config_key} to the file")
    path = Path(path)
    if not path.is_file():
        raise error(f"{config_key}: checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as reason:  # torch raises several unrelated types for unreadable files
        first_line = str(reason).splitlines()[0] if str(reason) else ""
        raise error(
            f"{path} is not a readable PyTorch checkpoint ({type(reason).__name__}: {first_line}); "
            f"point {config_key} at one"
        ) from reason
