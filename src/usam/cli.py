"""What every ``usam.<command>`` shares: its Hydra entry, ``--version``, ``--help`` from the
config's own comments, and the way it fails (``usam.command_errors``): a user error is one
line with exit code 2 (``verbose=true`` shows its traceback), any other error keeps its
traceback on screen and in the run's log. Nothing here loads torch, so help and version
answer at once."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from usam import __version__
from usam.command_help import command_help

CONF_DIR = Path(__file__).resolve().parent / "conf"


def _asks_verbose(arguments: list[str]) -> bool:
    """``verbose=true`` on the command line, read before Hydra composes the config."""
    return any(arg.lower().lstrip("+") == "verbose=true" for arg in arguments)


def command_line_sets(group: str) -> bool:
    """Whether this command's command line overrides config group ``group`` or one of its
    keys (False outside a Hydra run): a command's ``run`` asks, and passes the answer on."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    keys = (o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task)
    return any(key == group or key.startswith(f"{group}.") for key in keys)


def _task(config_name: str, implementation: str) -> Callable[[Any], None]:
    """Hydra's task function: checks the required keys, runs the command, and on failure
    sets the run folder aside and reports the error (``usam.command_errors``)."""

    def task(cfg: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        from usam import command_errors
        from usam.core.stopping import Stopped
        from usam.quiet import quiet_third_party

        if not cfg.get("verbose"):
            quiet_third_party()
        hydra_config = HydraConfig.get()
        run_dir, log_dir = Path(hydra_config.runtime.output_dir), Path(cfg.paths.log_dir)
        try:
            command_errors.check_required_keys(
                cfg, config_name, CONF_DIR, hydra_config.runtime.choices
            )
            result = importlib.import_module(implementation).run(cfg)
        except Exception as error:
            line = command_errors.handle_failure(error, config_name, run_dir, log_dir)
            if line is None:  # a bug: Python prints its traceback
                raise
            command_errors.exit_with_line(config_name, line, error if cfg.get("verbose") else None)
        except Stopped:  # the folder stays as it is: the line printed resumes in it (fit)
            raise
        except BaseException:  # an interrupt: no error to report, only the folder to tidy
            if command_errors.launched_rank() is None:  # rank zero tidies for every rank
                command_errors.set_failed_run_aside(run_dir, log_dir, keep=False)
            raise
        if isinstance(result, Path):
            print(result)

    return task


def _run_hydra(config_name: str, implementation: str, arguments: list[str]) -> None:
    """Hydra's entry with its own error report turned off (HYDRA_FULL_ERROR), so that a
    command line it cannot compose ends in one line here and a bug's traceback is whole."""
    import hydra

    from usam import command_errors
    from usam.core.config import register_resolvers

    register_resolvers()
    entry = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        entry(_task(config_name, implementation))()
    except command_errors.HYDRA_ERRORS as error:
        line = command_errors.composition_error_line(error)
        shown = error if _asks_verbose(arguments) else None
        command_errors.exit_with_line(config_name, line, shown)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def hydra_command(config_name: str, implementation: str) -> Callable[[], None]:
    """The ``main`` of a command whose config is ``conf/<config_name>.yaml`` and whose
    ``run(cfg)`` lives in module ``implementation``, imported only when the command runs.
    A ``run`` that returns a folder prints it (generate, ingest)."""

    def main() -> None:
        arguments = sys.argv[1:]
        if "--version" in arguments:
            print(f"usam {__version__}")
            return
        if "--help" in arguments or "-h" in arguments:
            print(command_help(config_name, CONF_DIR))
            return
        _run_hydra(config_name, implementation, arguments)

    return main
