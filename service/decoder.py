"""A training set's images, decoded in a process of its own, in the CPU time predicts leave.

A new head's examples (1,000 photos: a core-second of decoding) used to be decoded on a
nice-10 thread of the API worker, which shares the worker's GIL with its predicts: a
thread that holds the GIL when the kernel puts it aside holds up every thread of the
worker. In a process of its own the decoding has its own GIL; predict p99 while a
1,000-image head trained went from 133-360 ms to 108-171 ms (BENCHMARKS.md). Predicts
still decode on the worker's threads: they are small and must not wait behind a
training set. It runs at SCHED_IDLE (`service/priority.py`).

The decoded rows (150 MB for 1,000 images at 224 px) are written by the process straight
into memory it shares with the worker: a memfd, passed over the link (Linux only; unlike
a file in /dev/shm, which containers cap at 64 MB by default, it has no size limit of its
own). Received as messages, they cost the worker's nice-0 thread 0.26-0.51 s of CPU per
1,000 images, about half the decoding's own, which the predicts' backbone passes lost
while a set decoded (BENCHMARKS.md, fourth pass).

The link is the runner's wire (`service/link.py`): a socket pair, pickled messages. The
process starts at a worker's first training set and ends with the worker (its end of the
socket closes; and it watches the worker, ending mid-set if the worker dies:
`service/lifetime.py`).
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle

import numpy as np

from models.preprocess import InvalidInput, decode_images
from models.registry import ImagePreprocessing
from service.lifetime import start_python
from service.link import hang_up, recv, send

# The process idles before it imports what it decodes with (0.2 s of a core).
_START = (
    "from service.lifetime import end_with_starter; end_with_starter(); "
    "from service.priority import run_in_idle_time; run_in_idle_time(); "
    "from service.decoder import main; main()"
)


def _shared_rows(fd: int, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 rows over the memory of memfd `fd`, shared by every process that maps it."""
    return np.frombuffer(mmap.mmap(fd, int(np.prod(shape))), np.uint8).reshape(shape)


class TrainingDecoder:
    """The API worker's side: one decoding process, started when first needed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one set at a time crosses the link
        self._conn: Connection | None = None
        self._process: subprocess.Popen | None = None

    def decode(
        self, items: Sequence[tuple[int, bytes]], pre: ImagePreprocessing, max_pixels: int
    ) -> np.ndarray:
        side = pre.image_size
        shape = (len(items), side, side, 3)
        if not items:
            return np.empty(shape, np.uint8)
        fd = os.memfd_create("graft-training-rows", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, int(np.prod(shape)))
            rows = _shared_rows(fd, shape)  # the mapping outlives the descriptor
            with self._lock:
                error = self._ask((list(items), pre, max_pixels, shape), fd)
        finally:
            os.close(fd)
        if error is not None:
            raise InvalidInput(*error)
        return rows

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ask(self, message: tuple, fd: int) -> tuple | None:
        """Sends a set and the memory for its rows; the answer is the error, if any. A
        process that died is started again, once."""
        for attempt in (1, 2):
            conn = self._started()
            assert self._process is not None  # started with its link
            try:
                send(conn, message)
                send_handle(conn, fd, self._process.pid)
                return recv(conn)
            except (OSError, EOFError):
                self._stop()
                if attempt == 2:
                    raise RuntimeError("the image decoding process went away") from None
        raise AssertionError("unreachable")

    def _started(self) -> Connection:
        if self._conn is None:
            ours, theirs = socket.socketpair()
            with theirs:
                self._process = start_python(
                    _START, str(theirs.fileno()), pass_fds=(theirs.fileno(),)
                )
            self._conn = Connection(ours.detach())
        return self._conn

    def _stop(self) -> None:
        if self._conn is not None:
            hang_up(self._conn)  # the process reads the end of its link and exits
            self._conn = None
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def main() -> None:
    """The decoding process: for each (items, preprocessing, pixel limit, shape) message
    and the memfd that follows it, decodes the items into the memfd's rows and answers
    None, or the (error code, message) of the first bad image; until its link closes."""
    conn = Connection(int(sys.argv[1]))
    while True:
        try:
            items, pre, max_pixels, shape = recv(conn)
            fd = recv_handle(conn)
        except (EOFError, OSError):
            return
        try:
            decode_images(items, pre, max_pixels, out=_shared_rows(fd, shape))
            answer = None
        except InvalidInput as exc:
            answer = (exc.code, exc.message)
        finally:
            os.close(fd)
        send(conn, answer)
