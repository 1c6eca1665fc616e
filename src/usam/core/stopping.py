"""Stopping a long command cleanly: SIGINT (Ctrl-C) and SIGTERM (cluster preemption) end
extraction, annotation, generation and ingest at the next image boundary, with every
finished image kept and one line saying what is done and which command resumes; helper
processes die with their parent, even when it is killed with SIGKILL.

Exit codes follow the shell's convention, 128 + the signal number: 130 for SIGINT, 143
for SIGTERM. A second signal a second or more after the first stops at once (the files
are written atomically, so only the image in progress is lost). Under DDP every rank
installs the same handlers; rank zero passes SIGINT on to the ranks it launched
(Lightning passes SIGTERM on itself), so every rank stops at its own next image.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
REPEAT_AFTER_S = 1.0  # a signal this soon after the first is the same request (a terminal
# sends Ctrl-C to every process of the group, and rank zero passes it on too)


class Stopped(SystemExit):
    """Raised at an image boundary once a stop was requested; exits with 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class _Requests:
    """What the handlers saw: the first stop signal and when, ranks to pass it on to, and
    the unit of work the command finishes before stopping (the line the signal prints)."""

    signum: int | None = None
    at: float = 0.0
    followers: tuple[int, ...] = ()
    unit: str = "image"


_requests = _Requests()


def stop_requested() -> bool:
    return _requests.signum is not None


def requested_signal() -> int | None:
    """The stop signal this process got first, None before any."""
    return _requests.signum


def stop_if_requested() -> None:
    """Call at an image boundary: raises :class:`Stopped` once SIGINT or SIGTERM came."""
    if _requests.signum is not None:
        raise Stopped(_requests.signum)


def pass_stops_to(pids: list[int]) -> None:
    """Processes (DDP ranks this one launched) that get the SIGINT this one gets."""
    _requests.followers = tuple(pids)


def _on_signal(signum: int, frame: object) -> None:
    now = time.monotonic()
    if _requests.signum is None:
        _requests.signum, _requests.at = signum, now
        if not _is_launched_rank():
            line = f"stopping after the {_requests.unit} in progress (signal again to stop at once)"
            os.write(2, f"\n{line}\n".encode())
        if signum == signal.SIGINT:
            for pid in _requests.followers:
                _send(pid, signum)
    elif now - _requests.at >= REPEAT_AFTER_S:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # that rank has ended already


def resume_command(command: str, settings: Sequence[str] = ()) -> str:
    """This command line as ``python -m usam.<command> ...``, without ``overwrite=``,
    which would redo what is done, and with ``settings`` (``key=value`` overrides the
    resumed run needs, such as fit's run folder) in place of those keys' own."""
    replaced = {setting.split("=", 1)[0] for setting in settings} | {"overwrite"}
    kept = [arg for arg in sys.argv[1:] if arg.lstrip("+").split("=", 1)[0] not in replaced]
    return shlex.join(["python", "-m", f"usam.{command}", *kept, *settings])


def _is_launched_rank() -> bool:
    """A DDP rank other than the first, started by a launcher (or a task other than the
    first that ``srun`` started): rank zero speaks for it."""
    ranks = ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return any(os.environ.get(variable, "0") != "0" for variable in ranks)


@contextmanager
def stoppable(
    command: str,
    progress: Callable[[], str],
    resume_settings: Sequence[str] = (),
    unit: str = "image",
) -> Iterator[None]:
    """Stop requests end the work inside at the boundary of a ``unit`` (fit's is a batch);
    on the way out prints ``progress()`` (what is done, read from disk) and the command
    that resumes, with ``resume_settings`` in it (:func:`resume_command`)."""
    nested = signal.getsignal(signal.SIGINT) is _on_signal  # the outer one reports
    if nested or threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    _requests.unit = unit
    if _is_launched_rank():
        die_with_parent(os.getppid())
    try:
        yield
    except Stopped as stop:
        if not _is_launched_rank():
            print(
                f"stopped by {signal.Signals(stop.signum).name}: {progress()}; "
                f"the same command resumes: {resume_command(command, resume_settings)}",
                file=sys.stderr,
                flush=True,
            )
        gc.freeze()  # the exit's last collection over torch's objects would take seconds
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requests.signum, _requests.followers, _requests.unit = None, (), "image"


def die_with_parent(parent: int) -> None:
    """Have Linux kill this process when ``parent`` ends, SIGKILL included (a no-op elsewhere).

    Linux ties this to the thread that forked: DataLoader workers are started by the main
    thread here, and Lightning launches DDP ranks from it too.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(1)


def _worker_init(parent: int, worker_id: int) -> None:
    for signum in STOP_SIGNALS:  # the parent decides when its workers stop
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent(parent)


def worker_init_fn() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` for loaders built in this process: its workers
    ignore SIGINT and SIGTERM (the parent stops at an image boundary and shuts them down)
    and die with it, so no kill of the parent leaves them orphaned."""
    return functools.partial(_worker_init, os.getpid())
