"""What every ``usam.<command>`` shares: its Hydra entry, ``--version``, and user errors as
one line with exit code 2 instead of a traceback (``verbose=true`` shows it)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from usam import __version__
from usam.core.config import register_resolvers
from usam.core.errors import UsageError

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
USER_ERRORS = (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
EXIT_USAGE = 2


def hydra_command(config_name: str, run: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """The ``main`` of a command whose config is ``conf/<config_name>.yaml``."""
    register_resolvers()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def task(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except USER_ERRORS as error:
            if cfg.get("verbose"):
                raise
            print(f"usam.{config_name}: error: {error}", file=sys.stderr)
            sys.exit(EXIT_USAGE)

    def main() -> None:
        if "--version" in sys.argv[1:]:
            print(f"usam {__version__}")
            return
        task()

    return main
