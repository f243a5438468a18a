"""The API worker's side of the link to the backbone runner (`service/runner_server.py`):
one persistent connection per worker process, shared by its request threads."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection

from models.runtime import Top
from service.batcher import Priority, Rows
from service.link import Address, hang_up, recv, send, socket_family, widen

# How long a question to the runner (not a pass) may wait for its answer.
ANSWER_TIMEOUT_S = 60


class RunnerUnavailable(RuntimeError):
    """The runner could not be reached, or the connection broke with the request in it."""


class RunnerClient:
    """One connection to the runner, shared by a worker's threads; reconnects when lost."""

    def __init__(
        self,
        address: Address,
        *,
        authkey: bytes | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.address = address if isinstance(address, tuple) else str(address)
        self.authkey = authkey
        self.connect_timeout_s = connect_timeout_s
        self._conn: Connection | None = None
        self._pending: dict[int, Future] = {}
        self._widths: dict[str, tuple[int, ...]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _conn and _pending, and orders sends

    def embed(
        self,
        backbone_id: str,
        rows: Rows,
        priority: Priority = "predict",
        top: Top | None = None,
        depths: int = 0,
    ) -> Future:
        """Future of the rows' embeddings (through a fine-tuned head's top, with `top`),
        each followed by the deepest `depths` depths of the pass; fails with
        RunnerUnavailable if the link breaks."""
        return self._send(backbone_id, priority, rows, top, depths)

    def depth_widths(self, backbone_id: str) -> tuple[int, ...]:
        """The widths of the depths the backbone's pass gives, deepest last (asked once)."""
        if backbone_id not in self._widths:
            widths = self._send(backbone_id, "predict", None, None, 0).result(ANSWER_TIMEOUT_S)
            self._widths[backbone_id] = tuple(widths)
        return self._widths[backbone_id]

    def _send(self, backbone_id: str, priority: Priority, rows, top, depths: int) -> Future:
        future: Future = Future()
        with self._lock:
            conn = self._connected()
            request_id = next(self._ids)
            self._pending[request_id] = future
            try:
                send(conn, (request_id, backbone_id, priority, rows, top, depths))
            except OSError as exc:
                self._pending.pop(request_id, None)
                self._drop(conn)
                raise RunnerUnavailable(f"the backbone runner went away: {exc}") from None
        return future

    def is_connected(self) -> bool:
        with self._lock:
            try:
                self._connected(timeout_s=0)
            except RunnerUnavailable:
                return False
            return True

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._drop(self._conn)

    def _connected(self, timeout_s: float | None = None) -> Connection:
        if self._conn is not None:
            return self._conn
        deadline = time.monotonic() + (self.connect_timeout_s if timeout_s is None else timeout_s)
        while True:
            try:
                family = socket_family(self.address)
                conn = widen(Client(self.address, family=family, authkey=self.authkey))
                break
            except AuthenticationError as exc:
                raise RunnerUnavailable(f"the backbone runner refused the key: {exc}") from None
            except (OSError, EOFError) as exc:
                if time.monotonic() >= deadline:
                    raise RunnerUnavailable(
                        f"the backbone runner is not answering at {self.address}: {exc}"
                    ) from None
                time.sleep(0.1)
        self._conn = conn
        threading.Thread(
            target=self._read, args=(conn,), name="graft-runner-client", daemon=True
        ).start()
        return conn

    def _read(self, conn: Connection) -> None:
        try:
            while True:
                request_id, embeddings, error = recv(conn)
                with self._lock:
                    future = self._pending.pop(request_id, None)
                if future is None:
                    continue
                if error is None:
                    future.set_result(embeddings)
                else:
                    future.set_exception(RuntimeError(f"backbone runner: {error}"))
        except (EOFError, OSError):
            with self._lock:
                if self._conn is conn:
                    self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        """Called with the lock held: forgets the connection, fails what was in it."""
        self._conn = None
        hang_up(conn)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(RunnerUnavailable("the backbone runner went away"))
