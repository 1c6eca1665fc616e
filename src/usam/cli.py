"""What every ``usam.<command>`` shares: its Hydra entry, ``--version``, and user errors as
one line with exit code 2 instead of a traceback (``verbose=true`` shows it)."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from usam import __version__
from usam.core.config import register_resolvers, settings_from_config
from usam.core.errors import UsageError
from usam.inference.predictor import HeadCheckpoint
from usam.quiet import quiet_third_party
from usam.sam.amg_settings import AmgSettings

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
USER_ERRORS = (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
EXIT_USAGE = 2


def _set_failed_run_aside(run_dir: Path, log_dir: Path) -> None:
    """No failed run passes for a finished one: its folder goes when it holds only Hydra's
    own files (config copy, log), with the then-empty folders above it up to and including
    ``paths.log_dir``; a folder with anything else is renamed ``failed-<name>``, whole."""
    if not run_dir.is_dir() or not run_dir.is_relative_to(log_dir):
        return
    if any(entry.name != ".hydra" and entry.suffix != ".log" for entry in run_dir.iterdir()):
        failed = run_dir.with_name(f"failed-{run_dir.name}")
        run_dir.rename(failed)
        print(f"the failed run's files are in {failed}", file=sys.stderr)
        return
    shutil.rmtree(run_dir)
    for parent in run_dir.parents:
        if not parent.is_relative_to(log_dir) or any(parent.iterdir()):
            break
        parent.rmdir()


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


def hydra_command(config_name: str, run: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """The ``main`` of a command whose config is ``conf/<config_name>.yaml``."""
    register_resolvers()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def task(cfg: DictConfig) -> None:
        if not cfg.get("verbose"):
            quiet_third_party()
        try:
            run(cfg)
        except BaseException as error:
            _set_failed_run_aside(
                Path(HydraConfig.get().runtime.output_dir), Path(cfg.paths.log_dir)
            )
            if not isinstance(error, USER_ERRORS) or cfg.get("verbose"):
                raise
            print(f"usam.{config_name}: error: {error}", file=sys.stderr)
            sys.exit(EXIT_USAGE)

    def main() -> None:
        if "--version" in sys.argv[1:]:
            print(f"usam {__version__}")
            return
        task()

    return main
