"""The link between API workers and the backbone runner: a socket carrying arrays.

A Unix socket when the runner is a process of the same server (the default); TCP when
it runs in pods of its own (`GRAFT_RUNNER_LINK=tcp://host:port`), where both sides
prove they hold `GRAFT_RUNNER_KEY` (an HMAC challenge each way) before any message:
messages are pickles, which no one else may send.

The runner process (`service/runner_service.py`) owns the ONNX Runtime sessions; each API
worker process holds one `RunnerClient`, a persistent connection shared by its request
threads. A request is `(id, backbone, priority, rows, top)` (`top`: a fine-tuned head's
key and LoRA factors, or None) and its answer `(id, embeddings, error)`, pickled
(protocol 5) with its arrays sent as raw bytes beside it. Why not
BentoML's own calls between services: bench/handoff.py measures both (BENCHMARKS.md).

Only processes of the same user reach the Unix socket: it lives in a directory of mode
0700.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from multiprocessing import AuthenticationError
from multiprocessing.connection import (
    Client,
    Connection,
    Listener,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path

import numpy as np

from models.export import ensure_split, ensure_variant
from models.registry import BackboneSpec
from models.runtime import Backbone, Top
from service.batcher import Batcher, Priority, Rows
from service.link import hang_up, recv, send, widen
from service.settings import Settings

log = logging.getLogger(__name__)


# How long a stopping runner waits for the workers' last requests (their training jobs).
DRAIN_TIMEOUT_S = 60
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class RunnerUnavailable(RuntimeError):
    """The runner could not be reached, or the connection broke with the request in it."""


# The runner's side -----------------------------------------------------------------------


# Where the link is: a Unix socket's path, or (host, port) over TCP.
Address = Path | str | tuple[str, int]


def link_address(settings: Settings) -> tuple[Address, bytes | None]:
    """The runner link's address, and the key that TCP needs (None on a Unix socket)."""
    if settings.runner_link_address is None:
        return settings.runner_socket, None
    return settings.runner_link_address, settings.runner_key.encode()


def _family(address: Address) -> str:
    return "AF_INET" if isinstance(address, tuple) else "AF_UNIX"


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
        self._listener = Listener(address, family=_family(address))
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
                request_id, backbone_id, priority, rows, top = recv(conn)
                batcher = self.batchers.get(backbone_id)
                if batcher is None:
                    answers.put((request_id, None, f"no backbone {backbone_id!r} in this runner"))
                    continue
                try:
                    future = batcher.submit(rows, priority, top)
                except (RuntimeError, ValueError) as exc:  # stopping, or not fine-tunable
                    answers.put((request_id, None, str(exc)))
                    continue
                future.add_done_callback(lambda f, request_id=request_id: answer(request_id, f))
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


# The API worker's side -------------------------------------------------------------------


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
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _conn and _pending, and orders sends

    def embed(
        self,
        backbone_id: str,
        rows: Rows,
        priority: Priority = "predict",
        top: Top | None = None,
    ) -> Future:
        """Future of the rows' embeddings (through a fine-tuned head's top, with `top`);
        fails with RunnerUnavailable if the link breaks."""
        future: Future = Future()
        with self._lock:
            conn = self._connected()
            request_id = next(self._ids)
            self._pending[request_id] = future
            try:
                send(conn, (request_id, backbone_id, priority, rows, top))
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
                family = _family(self.address)
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


class Runner:
    """What the runner process holds: a session and a batcher per backbone, and the
    socket the API workers reach them through."""

    def __init__(self, settings: Settings) -> None:
        def session(spec: BackboneSpec, threads: int) -> Backbone:
            return Backbone(
                spec,
                ensure_variant(spec, settings.backbone_dir, settings.variant),
                device=settings.device,
                intra_op_threads=threads,
                max_batch_size=settings.backbone_batch_size,
                split=split_of(spec),
            )

        def split_of(spec: BackboneSpec) -> tuple[Path, Path] | None:
            return (
                ensure_split(spec, settings.backbone_dir) if settings.fine_tunable(spec) else None
            )

        def training_embed(spec: BackboneSpec) -> Callable[[Rows], np.ndarray]:
            # One thread, the lane's own: with two (niced) threads training took the
            # predict p99 to 3.3x and 5.4x its quiet value, against about 2x (BENCHMARKS.md).
            # A one-thread predict session runs on its caller's thread already: shared, it
            # costs no second copy of the weights (519 MiB for MPNet).
            if settings.intra_op_threads == 1:
                return self.backbones[spec.id].embed_rows
            return session(spec, 1).embed_rows

        # What each backbone costs this server, measured as it loads: `GET /v1/backbones`.
        self.measures: dict[str, dict] = {}
        self.backbones: dict[str, Backbone] = {}
        for spec in settings.loaded_backbones():
            # Exported (or quantised) first: that work's memory is not the session's.
            ensure_variant(spec, settings.backbone_dir, settings.variant)
            before = resident_bytes()
            backbone = session(spec, settings.intra_op_threads)
            ms_per_row = backbone.ms_per_row()  # also warms the session's memory up
            release_free_memory()
            self.backbones[spec.id] = backbone
            self.measures[spec.id] = {
                "memory_bytes": max(0, resident_bytes() - before),
                "ms_per_row": round(ms_per_row, 2),
            }
        batchers = {
            backbone_id: Batcher(
                backbone.embed_rows,
                name=backbone_id,
                max_batch_size=settings.backbone_batch_size,
                max_latency_ms=settings.batch_max_latency_ms,
                training_slice_ms=settings.training_slice_ms,
                predict_lanes=settings.backbone_lanes,
                # On the CPU, training rows get a session of their own, run at a low OS
                # priority (service/batcher.py); a GPU shares its one session.
                training_lane=(
                    None if backbone.on_gpu else functools.partial(training_embed, backbone.spec)
                ),
                check_top=backbone.check_factors if backbone.fine_tunable else None,
            )
            for backbone_id, backbone in self.backbones.items()
        }
        address, authkey = link_address(settings)
        self.server = RunnerServer(address, batchers, authkey=authkey)

    def stats(self) -> dict:
        return {backbone_id: b.stats() for backbone_id, b in self.server.batchers.items()}

    def close(self) -> None:
        self.server.close()


def release_free_memory() -> None:
    """Gives back to the OS what loading a session allocated and freed (parsing, graph
    optimisation): glibc keeps it otherwise. 20-90 MiB per backbone (BENCHMARKS.md)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE

    def close(self) -> None:
        self.server.close()


def serve_forever(path: Path, embedders: Mapping[str, Callable[[Rows], np.ndarray]]) -> None:
    """A bare runner over the given embed functions, until killed (bench/handoff.py runs
    one in a process of its own to time the link alone)."""
    batchers = {
        name: Batcher(embed, name=name, max_batch_size=64, max_latency_ms=0, training_slice_ms=20)
        for name, embed in embedders.items()
    }
    RunnerServer(Path(path), batchers)
    threading.Event().wait()
