"""Device names from configs ("auto", "cpu", "cuda:1") checked before any model loads."""

from __future__ import annotations

import torch

from usam.core.config import ConfigError


def resolve_device(name: str, key: str) -> torch.device:
    """``auto`` picks CUDA when torch sees a GPU; ``key`` names the config entry in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(
            f"{key}={name!r} is not a torch device (auto, cpu, cuda, cuda:N)"
        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{key}={name} asks for CUDA, but torch sees no GPU here; use auto or cpu"
        )
    return device
