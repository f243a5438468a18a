"""Every process Graft starts ends when the process that started it dies, however it died
(SIGKILL, the OOM killer, a supervisor that signals one process): BentoML's arbiter (the
`bentoml serve` process) with the process that started it (`make serve`, a supervisor,
`deploy/local_fleet.py`), its API workers and runner with the arbiter, a worker's image
decoder and fine-tuning processes with the worker. Without this, BentoML's workers (each
in a session of its own) outlived a killed arbiter, still answering on its port and
writing to its store.

On Linux the kernel does it: a process asks for a signal when its parent dies
(PR_SET_PDEATHSIG), here SIGKILL, as for the crash that took the parent. It then checks
that its parent is still the one that started it: one that died before the request would
go unnoticed. Elsewhere a thread watches the parent.

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
    """This process is killed when process `parent_pid`, its parent, dies; at once if it
    is not its parent any more (it died already)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(
            target=_watch_parent, args=(parent_pid,), name="graft-parent", daemon=True
        ).start()
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def is_arbiter() -> bool:
    """Whether this process is BentoML's arbiter: the first to import the service module
    (service/service.py), which records its pid for the workers it starts."""
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
    end_with_parent(int(os.environ[PARENT_PID]))


def dies_with_this_process() -> Callable[[], None]:
    """A `preexec_fn` for a program started with subprocess (nginx): it gets SIGTERM (its
    own clean stop) when this process dies. Linux only; elsewhere it does nothing."""
    parent = os.getpid()

    def preexec() -> None:
        if sys.platform == "linux":
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)

    return preexec
