"""Training's CPU work runs in the time predicts leave.

On this 2-core machine, with the runner's training lane at nice 19 and the decoding
process at nice 10, the server's busy nice-0 threads waited 0.65-0.69 s for a core per
second they ran while a 1,000-image head trained, against 0.21-0.26 when quiet; at
SCHED_IDLE, 0.57, and predict p99 during the training fell from 97-149 to 76-93 ms
(BENCHMARKS.md, fourth pass). Beyond its lower weight, the kernel counts a core that runs
only SCHED_IDLE threads as idle when it places a waking thread, which then takes that
core at once. Under a load that leaves no idle time, such work waits until the load dips.

A thread at SCHED_IDLE that the kernel puts aside while it holds the GIL holds up every
thread of its process until a core has nothing else to run. So only for work in a
process of its own (the decoding) or that holds the GIL only briefly between long
stretches without it (the runner's training lane: ONNX Runtime releases the GIL for the
whole pass). The API worker's training job (a fit, mostly Python and NumPy) stays at
nice 10 (service/training.py).
"""

from __future__ import annotations

import contextlib
import os
import threading

# The API worker's training job: below predicts, yet never set aside for long.
TRAINING_JOB_NICE = 10


def lower_this_thread(nice: int) -> None:
    """The calling thread, and the threads it starts from now on, at this nice (on Linux a
    thread's own; elsewhere it may be the process's, or refused)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def run_in_idle_time() -> None:
    """The calling thread, and the threads it starts from now on, at SCHED_IDLE (nice 19
    where the platform has no SCHED_IDLE)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except (AttributeError, OSError):
        lower_this_thread(19)
