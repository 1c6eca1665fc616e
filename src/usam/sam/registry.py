"""The SAM model types usam can build: every backend module's declarations in one table.

Each backend module (``BACKEND_MODULES``) declares its models as ``SPECS``
(``usam.sam.backend_spec.SamSpec``): builder, official weights, engine, and how to
recognise a state dict of its family. The registry merges them, resolves and loads
weights, and builds the engine a model type names, so everything downstream of it
(extraction, annotation, the benchmarks) works the same for every backend:

* ``usam.sam.sam1_backend``: SAM 1 (``vit_h|l|b``), MobileSAM (``vit_t``), ``tiny``;
* ``usam.sam.sam2_backend``: SAM 2.1 (``sam2.1_hiera_t|s|b+|l``), ``sam2.1_tiny``;
* ``usam.sam.hq_backend``: HQ-SAM (``hq_vit_b|l|h``, ``hq_vit_tiny``), ``hq_tiny``.

The ``*tiny`` models have random weights (fixed seed), so that tests and offline demos
run in seconds without a download; everything they produce is marked
``random_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from usam.sam import checkpoints
from usam.sam.amg_settings import AmgSettings
from usam.sam.backend_spec import SamSpec, make_mask_like
from usam.sam.mask_engine import PointGridEngine

DEFAULT_SEED = 0
# A new backend is one module here, its models' config files in conf/sam/, and nothing else.
BACKEND_MODULES = ("usam.sam.sam1_backend", "usam.sam.sam2_backend", "usam.sam.hq_backend")


def _merged_specs() -> dict[str, SamSpec]:
    specs: dict[str, SamSpec] = {}
    for name in BACKEND_MODULES:
        for spec in import_module(name).SPECS:
            if spec.model_type in specs:
                raise ValueError(f"SAM model type {spec.model_type!r} is declared twice ({name})")
            specs[spec.model_type] = spec
    return specs


SPECS: dict[str, SamSpec] = _merged_specs()


def get_spec(model_type: str) -> SamSpec:
    if model_type not in SPECS:
        raise ValueError(f"unknown SAM model type {model_type!r}; choose one of {sorted(SPECS)}")
    return SPECS[model_type]


@dataclass(frozen=True)
class SamSettings:
    """The ``sam`` config group: which SAM, and where its weights are."""

    model_type: str = "vit_h"
    checkpoint: str | None = None  # the official checkpoint file; None: cache, then download
    # where official checkpoints are found and downloaded to (${paths.cache_dir}/checkpoints);
    # None: usam.sam.checkpoints.default_cache_dir()
    cache_dir: str | None = None

    def check(self) -> None:
        spec = get_spec(self.model_type)
        if spec.require is not None:
            spec.require(self.model_type)

    def identity(self) -> dict[str, Any]:
        """What names this SAM for caching, known without loading or hashing the checkpoint
        (where the cache lies is not part of it)."""
        return {"model_type": self.model_type, "checkpoint": self.checkpoint or None}

    def build(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        return build_sam(self.model_type, self.checkpoint, cache_dir=self.cache_dir)

    def ensure_weights(self) -> Path | None:
        """The checkpoint this SAM will load (downloaded now when missing and online), or
        None for random weights; raises ``CheckpointError`` naming ``sam.checkpoint``."""
        return _weights_path(get_spec(self.model_type), self.checkpoint, self.cache_dir)


def identify(state_dict: dict[str, Any]) -> str | None:
    """Which registered architecture a state dict was saved from, judged by its encoder shape."""
    seen = None
    for spec in SPECS.values():
        shape = spec.read_encoder(state_dict)
        if shape == spec.encoder_shape:
            return spec.model_type
        seen = seen or shape
    if seen is None:
        return None
    kind, width, depth = seen
    return f"an unregistered {kind} encoder of width {width} and depth {depth}"


def build_random(model_type: str, seed: int = DEFAULT_SEED) -> torch.nn.Module:
    """Random weights drawn from ``seed`` (leaving the global RNG alone), decoder made mask-like."""
    spec = get_spec(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build()
    make_mask_like(model, spec)
    return model.eval()


def _weights_path(
    spec: SamSpec, checkpoint: str | Path | None, cache_dir: str | Path | None
) -> Path | None:
    """None for an architecture without official weights and no checkpoint given."""
    if spec.random_weights and checkpoint is None:
        return None
    if checkpoint is None:
        return checkpoints.resolve(spec.checkpoint_name, spec.url, spec.sha256, cache_dir=cache_dir)
    return checkpoints.resolve(Path(checkpoint).name, None, None, explicit=checkpoint)


def build_sam(
    model_type: str,
    checkpoint: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    random_weights: bool = False,
    seed: int = DEFAULT_SEED,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build a SAM in eval mode and describe it for the shard manifest.

    With ``random_weights`` (or for an architecture without official weights and no
    ``checkpoint``) the weights are the seeded default initialisation. Otherwise the
    checkpoint is resolved (explicit path, ``cache_dir``, download) and loaded.
    """
    spec = get_spec(model_type)
    path = None if random_weights else _weights_path(spec, checkpoint, cache_dir)
    named = {"model_type": model_type, "backend": spec.backend}
    if path is None:
        info = {**named, "checkpoint_sha256": None, "random_weights": True, "seed": seed}
        return build_random(model_type, seed), info
    model = spec.build()
    checkpoints.load_into(model, path, model_type, identify=identify, state_key=spec.state_key)
    model.eval()  # after loading: TinyViT caches its attention biases when put in eval mode
    info = {**named, "checkpoint_sha256": checkpoints.sha256_of(path), "random_weights": False}
    return model, info


def build_engine(model_type: str, model: torch.nn.Module, settings: AmgSettings) -> PointGridEngine:
    """The automatic mask engine of ``model``'s backend."""
    return get_spec(model_type).engine(model, settings)
