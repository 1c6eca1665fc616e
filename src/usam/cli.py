"""What every ``usam.<command>`` shares: its Hydra entry, ``--version``, ``--help`` from the
config's own comments, and user errors as one line with exit code 2 instead of a traceback
(``verbose=true`` shows it). Nothing here loads torch, so help and version answer at once."""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from usam import __version__
from usam.command_help import command_help
from usam.core.errors import UsageError

CONF_DIR = Path(__file__).resolve().parent / "conf"
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


def hydra_command(config_name: str, implementation: str) -> Callable[[], None]:
    """The ``main`` of a command whose config is ``conf/<config_name>.yaml`` and whose
    ``run(cfg)`` lives in module ``implementation``, imported only when the command runs.
    A ``run`` that returns a folder prints it (generate, ingest)."""

    def task(cfg: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        from usam.quiet import quiet_third_party

        if not cfg.get("verbose"):
            quiet_third_party()
        try:
            result = importlib.import_module(implementation).run(cfg)
        except BaseException as error:
            _set_failed_run_aside(
                Path(HydraConfig.get().runtime.output_dir), Path(cfg.paths.log_dir)
            )
            if not isinstance(error, USER_ERRORS) or cfg.get("verbose"):
                raise
            print(f"usam.{config_name}: error: {error}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        if isinstance(result, Path):
            print(result)

    def main() -> None:
        arguments = sys.argv[1:]
        if "--version" in arguments:
            print(f"usam {__version__}")
            return
        if "--help" in arguments or "-h" in arguments:
            print(command_help(config_name, CONF_DIR))
            return
        import hydra

        from usam.core.config import register_resolvers

        register_resolvers()
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(task)()

    return main
