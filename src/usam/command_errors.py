"""How a command ends when it fails. An error the user can fix (a ``UsageError``, a required
key left out, a config group option that does not exist, a bad override) is one line naming
the key and the fix, exit code 2 (after its traceback with ``verbose=true``). Anything else is
a bug: its traceback stays on screen and goes into the run's log file, and the run folder is
kept for it. Under DDP the report is rank zero's, so that it comes once."""

from __future__ import annotations

import difflib
import logging
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from usam.command_help import key_comment
from usam.core.errors import UsageError

EXIT_BUG = 1
EXIT_USAGE = 2
# how long a rank Lightning launched waits for rank zero to report an error both met
RANK_ZERO_REPORTS_WITHIN_S = 30.0
HYDRA_ERRORS = (ConfigCompositionException, OverrideParseException)
_FULL_KEY = re.compile(r"^full_key: (?P<key>\S+)$", re.MULTILINE)
_NAMES_A_KEY = re.compile(r"^[A-Za-z_][\w.]*(=|: )")  # "teacher_ckpt: ...", "sam.device=..."
_RUN_BOOKKEEPING = {".hydra", "config.yaml"}  # with the run's *.log: what every run writes first
# the Hydra job name Lightning's DDP launcher gives each rank it starts with the command line
_LAUNCHED_RANK_JOB = re.compile(r"train_ddp_process_(?P<rank>\d+)")
_PARENT_PID = os.getppid()  # for a launched rank, its rank zero: read before either can end


class MissingKeysError(UsageError):
    """Required keys (``???`` in the config) left out of the command line."""


def _missing_keys(value: object, key: str = "") -> list[str]:
    """The ``???`` keys of a config read without resolving it, since an interpolation into
    a group this command does not compose must not stop it."""
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in _missing_keys(v, f"{key}{k}.")]
    if isinstance(value, list):
        return [m for i, v in enumerate(value) for m in _missing_keys(v, f"{key}{i}.")]
    return [key.rstrip(".")] if value == "???" else []


def check_required_keys(
    cfg: DictConfig, config_name: str, conf_dir: Path, choices: Mapping[str, str]
) -> None:
    """Every ``???`` key is named before any work starts, with what it takes."""
    missing = sorted(_missing_keys(OmegaConf.to_container(cfg, resolve=False)))
    if not missing:
        return
    described = []
    for key in missing:
        comment = key_comment(key, config_name, conf_dir, choices)
        described.append(f"{key} ({comment})" if comment else key)
    settings = " ".join(f"{key}=..." for key in missing)
    noun = "key" if len(missing) == 1 else "keys"
    raise MissingKeysError(
        f"required {noun} not set: {', '.join(described)}; add {settings} to the command "
        f"(python -m usam.{config_name} --help lists what each key takes)"
    )


def user_error_line(error: BaseException) -> str | None:
    """The one line for an error the user can fix; None for a bug. An error raised while
    Hydra builds a ``_target_`` is reported by its own message, prefixed with the config
    key that built it unless the message starts with a key of its own."""
    key = None
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        found = _FULL_KEY.search(str(error))
        key = found["key"] if found else key
        error = error.__cause__
    if not isinstance(error, UsageError):
        return None
    message = " ".join(str(error).split())
    return message if key is None or _NAMES_A_KEY.match(message) else f"{key}: {message}"


def _unknown_key_line(error: Exception) -> str | None:
    """A misspelt key of the command line, named with the closest key that exists; Hydra's
    own advice, to append it with ``+``, adds a key that nothing reads. None for any other
    composition error."""
    cause = error.__cause__
    parent = getattr(cause, "parent_node", None)
    if not isinstance(cause, ConfigAttributeError | ConfigKeyError) or not isinstance(
        parent, DictConfig
    ):
        return None
    group = cause.full_key.rpartition(".")[0]
    known = [str(key) for key in parent.keys()]
    line = f"unknown key {cause.full_key}"
    if not known:  # below a plain value such as seed.x: there are no keys to offer
        return line
    close = difflib.get_close_matches(str(cause.key), known, n=1)
    prefix = f"{group}." if group else ""
    hint = f"did you mean {prefix}{close[0]}" if close else f"valid keys: {', '.join(known)}"
    return f"{line}; {hint}"


def composition_error_line(error: Exception) -> str:
    """One line for a command line Hydra cannot compose; an unknown group option lists the
    options that exist, closest first, and an unknown key names the closest that exists."""
    unknown_key = _unknown_key_line(error)
    if unknown_key is not None:
        return unknown_key
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        options = sorted(
            error.options,
            key=lambda name: -difflib.SequenceMatcher(None, option, name).ratio(),
        )
        return f"{group}={option} does not exist; choose one of: {', '.join(options)}"
    text = str(error).split("\nConfig search path:")[0]
    if error.__cause__ is not None:
        text += f" ({str(error.__cause__).splitlines()[0]})"
    return " ".join(text.split())


def launched_rank() -> int | None:
    """The local rank of a process Lightning's DDP launcher started by running the user's
    command line again; None for the process the user started (rank zero of its node)."""
    if not HydraConfig.initialized():
        return None
    found = _LAUNCHED_RANK_JOB.fullmatch(HydraConfig.get().job.name)
    return int(found["rank"]) if found else None


def log_traceback(error: BaseException, config_name: str, into: Path | None = None) -> None:
    """Writes the traceback into the process's log file (Hydra's job log), or into the file
    ``into``: a launched rank's job log is its own (``train_ddp_process_<rank>.log``), not
    the run's ``<command>.log`` people read. The screen gets it from Python itself, so the
    console handlers are left out."""
    rank = launched_rank()
    message = f"usam.{config_name} failed" + ("" if rank is None else f" on DDP local rank {rank}")
    exc_info = (type(error), error, error.__traceback__)
    record = logging.LogRecord("usam", logging.ERROR, __file__, 0, message, None, exc_info)
    job_logs = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if into is None:
        for handler in job_logs:
            handler.handle(record)
            handler.flush()
        return
    appended = logging.FileHandler(into)
    appended.setFormatter(job_logs[0].formatter if job_logs else None)
    appended.handle(record)
    appended.close()


def _rank_zero_ended(within_s: float) -> bool:
    """Whether rank zero, which launched this rank, ends within ``within_s`` seconds. The
    ranks run in step, so rank zero meets the same error and reports it; a rank zero still
    running after that is waiting for this rank, which has to report its error itself."""
    deadline = time.monotonic() + within_s
    while os.getppid() == _PARENT_PID:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def handle_failure(error: Exception, config_name: str, run_dir: Path, log_dir: Path) -> str | None:
    """What a failed run does before it reports: a bug's traceback goes into the run's log
    and the run folder is set aside. Returns the user error's one line, None for a bug. A
    launched rank leaves the report and the folder to rank zero, and once rank zero has
    ended (reporting) exits here without a word, so that the error is printed once and the
    folder is not moved while rank zero still works in it."""
    line = user_error_line(error)
    if line is None:
        log_traceback(error, config_name)
    if launched_rank() is not None:
        if _rank_zero_ended(RANK_ZERO_REPORTS_WITHIN_S):
            sys.exit(EXIT_BUG if line is None else EXIT_USAGE)
        if line is None:  # this rank reports: its traceback goes where rank zero's would
            log_traceback(error, config_name, into=run_dir / f"{config_name}.log")
    failed = set_failed_run_aside(run_dir, log_dir, keep=line is None)
    if failed is not None:
        print(f"the failed run's files are in {failed}", file=sys.stderr)
    return line


def _holds_results(folder: Path) -> bool:
    """Whether a run folder holds anything but what every run writes first (Hydra's
    files, the log, the config copy) and empty folders."""
    for entry in folder.iterdir():
        if entry.name in _RUN_BOOKKEEPING or (entry.is_file() and entry.suffix == ".log"):
            continue
        if entry.is_file() or any(path.is_file() for path in entry.rglob("*")):
            return True
    return False


def set_failed_run_aside(run_dir: Path, log_dir: Path, keep: bool) -> Path | None:
    """No failed run passes for a finished one. A folder holding results, or one ``keep``
    asks for (a bug's log), is renamed ``failed-<name>`` whole and returned; any other goes,
    with the then-empty folders above it up to and including ``log_dir``."""
    if not run_dir.is_dir() or not run_dir.is_relative_to(log_dir):
        return None
    if keep or _holds_results(run_dir):
        failed = run_dir.with_name(f"failed-{run_dir.name}")
        run_dir.rename(failed)
        return failed
    shutil.rmtree(run_dir)
    for parent in run_dir.parents:
        if not parent.is_relative_to(log_dir) or any(parent.iterdir()):
            break
        parent.rmdir()
    return None


def exit_with_line(
    config_name: str, line: str, traceback_of: BaseException | None = None
) -> NoReturn:
    """A user error's end: its one line and exit code 2, after the traceback of
    ``traceback_of`` (the error, when ``verbose=true`` asks to see it)."""
    if traceback_of is not None:
        traceback.print_exception(traceback_of)
    print(f"usam.{config_name}: error: {line}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
