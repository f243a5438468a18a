"""A training set's images, decoded in a process of its own at a lower priority.

A new head's examples (1,000 photos: a core-second of decoding) used to be decoded on a
nice-10 thread of the API worker, which shares the worker's GIL with its predicts: a
thread that holds the GIL when the kernel puts it aside holds up every thread of the
worker. In a process of its own the decoding has its own GIL; predict p99 while a
1,000-image head trained went from 133-360 ms to 108-171 ms (BENCHMARKS.md). Predicts
still decode on the worker's threads: they are small and must not wait behind a
training set.

The wire is the runner's (`service/link.py`): a socket pair, pickled messages, arrays as
raw bytes. The process starts at a worker's first training set and ends with the
worker (its end of the socket closes, whatever killed the worker).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from models.preprocess import InvalidInput, decode_images
from models.registry import ImagePreprocessing
from service.link import hang_up, recv, send

# Images per message: a message's rows (4.8 MB at 224 px) are copied into the set's array
# in one short hold of the worker's GIL.
IMAGES_PER_MESSAGE = 32
NICE = 10
_ROOT = Path(__file__).resolve().parents[1]


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
        rows = np.empty((len(items), side, side, 3), np.uint8)
        with self._lock:
            for start in range(0, len(items), IMAGES_PER_MESSAGE):
                chunk = items[start : start + IMAGES_PER_MESSAGE]
                decoded, error = self._ask((list(chunk), pre, max_pixels))
                if error is not None:
                    raise InvalidInput(*error)
                rows[start : start + len(chunk)] = decoded
        return rows

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ask(self, message: tuple) -> tuple:
        """One request and its answer; a process that died is started again, once."""
        for attempt in (1, 2):
            conn = self._started()
            try:
                send(conn, message)
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
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "service.decoder", str(theirs.fileno())],
                    pass_fds=[theirs.fileno()],
                    env={
                        **os.environ,
                        "PYTHONPATH": f"{_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    },
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
    """The decoding process: answers each (items, preprocessing, pixel limit) message with
    (rows, None) or (None, (error code, message)), until its link closes."""
    os.nice(NICE)
    conn = Connection(int(sys.argv[1]))
    while True:
        try:
            items, pre, max_pixels = recv(conn)
        except (EOFError, OSError):
            return
        try:
            answer = (decode_images(items, pre, max_pixels), None)
        except InvalidInput as exc:
            answer = (None, (exc.code, exc.message))
        send(conn, answer)


if __name__ == "__main__":
    main()
