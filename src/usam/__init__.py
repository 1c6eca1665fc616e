"""usam: Segment Anything made semantics-aware for the class names you pick (U-SAM).

The public API is imported on first use, so ``usam --version`` does not load torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("usam")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

_PUBLIC = {
    "Annotator": "usam.inference.annotator",
    "Predictor": "usam.inference.predictor",
    "InferenceSettings": "usam.inference.predictor",
    "load_head": "usam.inference.predictor",
    "AmgSettings": "usam.sam.amg_settings",
    "AutomaticMaskEngine": "usam.sam.sam1_backend",
    "SamSettings": "usam.sam.registry",
    "build_sam": "usam.sam.registry",
    "build_engine": "usam.sam.registry",
    "load_vocabulary": "usam.core.vocabulary",
    "ShardDataModule": "usam.data.datamodule",
    "MaskClassifierHead": "usam.train.head",
    "TeacherModule": "usam.train.lightning_modules",
    "StudentModule": "usam.train.lightning_modules",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'usam' has no attribute {name!r}")
