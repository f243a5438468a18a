"""The runner's side of the link between API workers and the backbone runner.

A Unix socket when the runner is a process of the same server (the default); TCP when
it runs in pods of its own (`GRAFT_RUNNER_LINK=tcp://host:port`), where both sides
prove they hold `GRAFT_RUNNER_KEY` (an HMAC challenge each way) before any message:
messages are pickles, which no one else may send. Only processes of the same user reach
the Unix socket: it lives in a directory of mode 0700.

A request is `(id, backbone, priority, rows, top, depths)` (`top`: a fine-tuned head's key
and LoRA factors, or None; `depths`: how many of the deepest depths follow each row's
embedding) and its answer `(id, embeddings, error)`; one with no rows (None) asks for the
widths of the backbone's depths instead (a worker's training cuts its rows by them), and
its answer carries them. Framed by
`service/link.py`. Why not BentoML's own calls between services: BENCHMARKS.md (the
hand-off between processes, issue 10).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from multiprocessing import AuthenticationError
from multiprocessing.connection import (
    Connection,
    Listener,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path

import numpy as np

from service.batcher import Batcher, Rows
from service.link import Address, hang_up, recv, send, socket_family, widen

log = logging.getLogger(__name__)

# How long a stopping runner waits for the workers' last requests (their training jobs).
DRAIN_TIMEOUT_S = 60


class RunnerServer:
    """Accepts API workers' connections and feeds their rows to one batcher per backbone."""

    def __init__(
        self, address: Address, batchers: Mapping[str, Batcher], *, authkey: bytes | None = None
    ) -> None:
        if not isinstance(address, tuple):
            path = Path(address)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left by a runner that was killed
            address = str(path)
        elif authkey is None:
            raise ValueError("a runner link over TCP needs a key")
        self.address = address
        self.batchers = batchers
        self._authkey = authkey
        # Authenticated per connection, on its own thread: a client that never answers
        # the challenge holds up that thread only, not the accepting one.
        self._listener = Listener(address, family=socket_family(address))
        self._connections = 0
        self._connections_changed = threading.Condition()
        self._thread = threading.Thread(
            target=self._accept, name="graft-runner-accept", daemon=True
        )
        self._thread.start()

    def close(self, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Takes no new connection; the batchers stop once every worker has hung up, which
        a worker does at its own shutdown, after its training jobs (a server's processes
        all shut down at once), or after `drain_timeout_s`."""
        self._listener.close()
        with self._connections_changed:
            self._connections_changed.wait_for(lambda: not self._connections, drain_timeout_s)
        for batcher in self.batchers.values():
            batcher.close()
        if not isinstance(self.address, tuple):
            with contextlib.suppress(FileNotFoundError):
                Path(self.address).unlink()

    def _accept(self) -> None:
        while True:
            try:
                conn = widen(self._listener.accept())
            except OSError:
                return  # closed
            with self._connections_changed:
                self._connections += 1
            threading.Thread(
                target=self._serve, args=(conn,), name="graft-runner-conn", daemon=True
            ).start()

    def _serve(self, conn: Connection) -> None:
        try:
            if self._authkey is not None:
                try:
                    deliver_challenge(conn, self._authkey)
                    answer_challenge(conn, self._authkey)
                except (AuthenticationError, EOFError, OSError) as exc:
                    log.warning("refused a runner link connection: %s", exc)
                    hang_up(conn)
                    return
            self._answer_requests(conn)
        finally:
            with self._connections_changed:
                self._connections -= 1
                self._connections_changed.notify_all()

    def _answer_requests(self, conn: Connection) -> None:
        # Answers go out from a thread of their own: a worker slow to read never holds up
        # a batcher thread, and with it every other worker.
        answers: queue.SimpleQueue = queue.SimpleQueue()
        writer = threading.Thread(target=self._write, args=(conn, answers), daemon=True)
        writer.start()

        def answer(request_id: int, future: Future) -> None:
            error = future.exception()
            answers.put(
                (request_id, None, repr(error)) if error else (request_id, future.result(), None)
            )

        try:
            while True:
                request_id, backbone_id, priority, rows, top, depths = recv(conn)
                batcher = self.batchers.get(backbone_id)
                if batcher is None:
                    answers.put((request_id, None, f"no backbone {backbone_id!r} in this runner"))
                    continue
                if rows is None:
                    widths = batcher.layout.depth_widths if batcher.layout else ()
                    answers.put((request_id, widths, None))
                    continue
                try:
                    future = batcher.submit(rows, priority, top, depths)
                except (RuntimeError, ValueError) as exc:  # stopping, or not fine-tunable
                    answers.put((request_id, None, str(exc)))
                    continue
                future.add_done_callback(functools.partial(answer, request_id))
        except (EOFError, OSError):
            pass  # the worker went away
        finally:
            answers.put(None)

    @staticmethod
    def _write(conn: Connection, answers: queue.SimpleQueue) -> None:
        with conn:
            while (message := answers.get()) is not None:
                try:
                    send(conn, message)
                except OSError:
                    return


def serve_forever(path: Path, embedders: Mapping[str, Callable[[Rows], np.ndarray]]) -> None:
    """A bare runner over the given embed functions, until killed (tests/test_runner.py
    runs one in a process of its own, and kills it)."""
    batchers = {
        name: Batcher(embed, name=name, max_batch_size=64, max_latency_ms=0, training_slice_ms=20)
        for name, embed in embedders.items()
    }
    RunnerServer(Path(path), batchers)
    threading.Event().wait()
