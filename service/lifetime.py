"""Every process Graft starts ends when the process that started it dies, however it died
(SIGKILL, the OOM killer, a supervisor that signals one process): BentoML's arbiter (the
`bentoml serve` process) with the process that started it (`make serve`, a supervisor,
`deploy/local_fleet.py`), its API workers and runner with the arbiter, a worker's image
decoder and fine-tuning processes with the worker. Without this, BentoML's workers (each
in a session of its own) outlived a killed arbiter, still answering on its port and
writing to its store.

BentoML's workers ask the kernel for SIGKILL when the arbiter dies (Linux's
PR_SET_PDEATHSIG), as for the crash that took it, then check that their parent is still
the arbiter: one that died before the request would go unnoticed. The kernel sends that
signal when the *thread* that started the process ends; the arbiter starts its workers
from its main loop, which lives as long as it does. Other processes may be started from
threads that end first (a request's thread starts a worker's decoder; the local fleet
starts replicas from a pool's threads), so the arbiter and a worker's own processes
watch their parent process instead: a thread that looks every half second. Elsewhere
than Linux every process watches so.

A server started on purpose without a parent to end with (`nohup bentoml serve &` from a
shell that then exits) sets GRAFT_END_WITH_PARENT=false; its own processes still end
with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

# The arbiter's pid, in the environment its workers inherit (circus copies it).
ARBITER_PID = "GRAFT_ARBITER_PID"
# The pid a Python child of a Graft process ends with (`start_python`).
PARENT_PID = "GRAFT_PARENT_PID"
_PR_SET_PDEATHSIG = 1
_ROOT = Path(__file__).resolve().parents[1]


def end_with_parent(parent_pid: int) -> None:
    """This process is killed when process `parent_pid`, its parent, dies (or the thread
    of it that started this process ends: see above); at once if it is not its parent any
    more."""
    if sys.platform != "linux":
        watch_parent(parent_pid)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(parent_pid: int, every_s: float = 0.5) -> None:
    """This process is killed within `every_s` of process `parent_pid`, its parent,
    dying (at once if it is not its parent any more), whichever thread started it."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="graft-parent", daemon=True).start()


def record_arbiter() -> bool:
    """Records this process as BentoML's arbiter, for the workers it starts, unless one is
    recorded already: the first process to import the service module (service/service.py)
    is the arbiter; its workers inherit the record. Whether this process is it."""
    return os.environ.setdefault(ARBITER_PID, str(os.getpid())) == str(os.getpid())


def end_with_arbiter() -> None:
    """In a BentoML worker (API worker or runner): end when the arbiter does."""
    end_with_parent(int(os.environ[ARBITER_PID]))


def start_python(code: str, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """A Python process running `code` with `args` (this checkout importable); `code`
    calls `end_with_starter()` first, so that it ends when this process does."""
    env = {
        **os.environ,
        PARENT_PID: str(os.getpid()),
        "PYTHONPATH": f"{_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    env.pop(ARBITER_PID, None)  # not a BentoML worker: it imports no service module
    return subprocess.Popen([sys.executable, "-c", code, *args], pass_fds=pass_fds, env=env)


def end_with_starter() -> None:
    """In a process `start_python` started: end when the process that started it does."""
    watch_parent(int(os.environ[PARENT_PID]))


def dies_with_this_process() -> Callable[[], None]:
    """A `preexec_fn` for a program started with subprocess (nginx), from a thread that
    lives as long as it: it gets SIGTERM (its own clean stop) when this process dies.
    Linux only; elsewhere it does nothing."""
    parent = os.getpid()

    def preexec() -> None:
        if sys.platform == "linux":
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)

    return preexec
