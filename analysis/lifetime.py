"""Local workers that end with their driver, Ctrl-C that stops them, and the missing main guard.

* A worker of the local pool ends when the process that started it ends, however it ends (kill
  -9, an OOM kill, pre-emption): on Linux the kernel kills it (a parent-death signal), and on
  every system a thread in it waits on its parent's sentinel (a pipe the parent holds open, or
  on Windows the parent's process handle) and ends the worker once that is ready. What a killed
  worker leaves in the store (a temporary, a claim) is removed by the next sweep, as after any
  crash.
* Workers ignore SIGINT: Ctrl-C reaches every process of the terminal's foreground group, and
  the driver alone decides what stops (:meth:`analysis.executors.Executor.stop`), so no worker
  prints a KeyboardInterrupt traceback of its own.
* A script that starts a sweep with local workers at its top level, outside
  ``if __name__ == "__main__":``, would be run again by every spawned worker (workers import the
  main module); :func:`check_main_guard` says so in one line (:class:`MissingMainGuard`) before
  any worker starts, and in a worker that is importing such a script.
"""

from __future__ import annotations

import ast
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WORKER_ORPHANED = 70  # a worker's exit status once its driver is gone


class MissingMainGuard(SystemExit):
    """A sweep with local workers started where the workers would start it again. A SystemExit,
    so an uncaught one prints its one line, not a traceback, in the script and in a worker."""


def guard_message(script: str) -> str:
    return (
        f"{script} starts a sweep at its top level, and each local worker process (jobs > 1) "
        f"imports {Path(script).name} again and would start it anew: put the sweep under "
        '`if __name__ == "__main__":`'
    )


def _bootstrapping_script() -> str | None:
    """In a spawned worker that is importing the main script (as ``__mp_main__``): its path."""
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return None
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") != "__mp_main__":
        frame = frame.f_back
    return (frame.f_globals.get("__file__") if frame else None) or "the main script"


def _rerun_main() -> str | None:
    """The script that spawned workers import again before they work, or None: mirrors what
    ``multiprocessing.spawn`` does (a package's ``__main__`` and IPython are not re-run)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return None if name == "__main__" or name.endswith(".__main__") else path
    if path is None or Path(path).stem == "ipython":
        return None
    return path


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` (either side, any comparison of the two)."""
    if not isinstance(node, ast.If):
        return False
    names = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
    consts = {n.value for n in ast.walk(node.test) if isinstance(n, ast.Constant)}
    return "__name__" in names and "__main__" in consts


def check_main_guard(spawning: bool = True) -> None:
    """Raise :class:`MissingMainGuard` if a sweep starts where it should not: while this
    process, a spawned worker, imports the main script; or, when about to spawn workers
    (``spawning``), from the main script's top level outside ``if __name__ == "__main__":``."""
    script = _bootstrapping_script()
    if script is not None:
        raise MissingMainGuard(guard_message(script))
    script = _rerun_main() if spawning else None
    if script is None:
        return
    main = sys.modules["__main__"].__dict__
    frame = sys._getframe(1)
    while frame is not None and not (
        frame.f_globals is main and frame.f_code.co_name == "<module>"
    ):
        frame = frame.f_back
    if frame is None:  # the script's top level has finished: workers re-run only its definitions
        return
    try:
        tree = ast.parse(Path(script).read_text())
    except (OSError, SyntaxError, ValueError):
        return  # cannot tell here; a worker that re-runs the sweep still says so (above)
    line = frame.f_lineno
    for node in tree.body:
        if _is_main_guard(node) and node.lineno <= line <= node.end_lineno:
            return
    raise MissingMainGuard(guard_message(script))


@dataclass(frozen=True)
class Lifeline:
    """What a pool worker needs to end with its driver: the driver's pid and whether Linux's
    parent-death signal may be used (``signal``).

    Built when pickled, which happens in the thread that spawns the worker: the kernel sends the
    parent-death signal when that *thread* ends, so it is asked for only when the spawning
    thread is the main thread, which ends only with the process. Workers spawned by another
    thread rely on the sentinel watch alone."""

    pid: int = 0
    signal: bool = False

    def __reduce__(self):
        spawner_is_main = threading.current_thread() is threading.main_thread()
        return (Lifeline, (os.getpid(), spawner_is_main))


def _parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when the thread that spawned it ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no prctl in this libc
        return False


def _exit_with(parent) -> None:
    parent.join()  # returns once the parent's sentinel is ready: the parent has ended
    os._exit(WORKER_ORPHANED)


def worker_init(lifeline: Lifeline) -> None:
    """Initialiser of the local pool's workers: ignore SIGINT and end with the driver."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked by :func:`sigint_deferred` at the spawn
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if lifeline.signal and sys.platform.startswith("linux"):
        _parent_death_signal()
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with, args=(parent,), name="parent-watch", daemon=True
        ).start()
    if os.name == "posix" and os.getppid() != lifeline.pid:
        os._exit(WORKER_ORPHANED)  # the driver died before the signal was asked for


@contextmanager
def sigint_deferred():
    """Block SIGINT in this thread while the body spawns workers. A spawned worker inherits the
    mask, so a Ctrl-C during its start-up, before :func:`worker_init` ignores SIGINT, cannot
    make it print a traceback; in this process the signal stays pending until unblocked."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
