"""How a run shows up on a W&B dashboard: a name, a group, tags and a flat config, so the runs
of one sweep are told apart, grouped together and sortable on every swept key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from usam.core.provenance import Provenance


@dataclass(frozen=True)
class RunIdentity:
    name: str
    group: str
    tags: list[str]


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config with dotted keys (``model.teacher.top_k``): one W&B column each."""
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                visit(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    visit(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def _swept_overrides() -> list[tuple[str, str]]:
    """(key, value) of this multirun job for the keys its sweep varies, in sweep order."""
    hydra_cfg = HydraConfig.get()
    sweep_file = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if hydra_cfg.mode != RunMode.MULTIRUN or not sweep_file.is_file():
        return []
    launched = OmegaConf.load(sweep_file).hydra.overrides.task
    swept = {
        o.key_or_group
        for o in OverridesParser.create().parse_overrides(list(launched))
        if o.is_sweep_override()
    }
    own = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    return [(o.key_or_group, str(o.value())) for o in own if o.key_or_group in swept]


def run_identity(cfg: DictConfig, job: str, provenance: Provenance) -> RunIdentity:
    """``job`` is the stage (``teacher``) or the command (``eval``)."""
    swept = _swept_overrides() if HydraConfig.initialized() else []
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    experiment = choices.get("experiment")
    if swept:
        name = ",".join(f"{key.split('.')[-1]}={value}" for key, value in swept) + f"-{job}"
        group = f"{cfg.run_name}-sweep-{Path(HydraConfig.get().sweep.dir).name}"
    else:
        name, group = f"{cfg.run_name}-{job}", str(cfg.run_name)
    tags = [*(cfg.get("tags") or [])]
    tags += [f"experiment:{experiment}"] if experiment else []
    if "data" in cfg:
        tags.append(f"source:{cfg.data.source}")
    baseline = cfg.get("baseline")
    if baseline:
        tags.append(f"baseline:{baseline.name}")
    if not baseline or baseline.name != "sam3":  # SAM 3 makes its own masks
        tags.append(f"sam:{cfg.sam.model_type}")
    tags += provenance.tags()
    return RunIdentity(name=name, group=group, tags=list(dict.fromkeys(tags)))
