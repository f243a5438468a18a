"""Request limits: the body size, enforced while the body streams in (not only by its
header), and a request rate per tenant."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.store import retry_while_locked
from service.errors import PayloadTooLarge, send_error


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the app, where the error handlers answer it as a 413.
                    raise PayloadTooLarge(f"request body over {self.max_bytes} bytes")
                if message.get("more_body"):
                    # Let other requests run between chunks: a large upload whose chunks
                    # are already buffered would otherwise hold this worker's event loop
                    # while it is parsed (150 ms for a 30 MB archive).
                    await asyncio.sleep(0)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        message = f"request body over {self.max_bytes} bytes"
        await send_error(send, 413, "payload_too_large", message, ((b"connection", b"close"),))


class RateLimiter:
    """A token bucket per tenant: `rate` requests per second sustained, `burst` at once.

    The buckets live in a small SQLite file beside the runner's socket, so every API
    worker of this machine takes from the same bucket, whichever worker a connection
    lands on. Written without fsync: after a crash, buckets simply start full again.

    In a fleet of N replicas, each holds a tenant to 1/N of the rate and burst
    (`share_with`), so that the fleet as a whole holds it to them.
    """

    # Past this many buckets, those that have refilled (idle tenants) are dropped.
    PRUNE_AT = 100_000

    def __init__(self, rate: float, burst: int, path: Path, clock=time.monotonic) -> None:
        # time.monotonic is one clock for every process of a machine (CLOCK_MONOTONIC).
        self.fleet_rate, self.fleet_burst = rate, burst
        self.rate, self.burst = rate, float(burst)
        self._clock = clock
        self._path = path
        self._local = threading.local()  # a connection per thread
        if rate > 0:
            with self._db() as db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS buckets"
                    " (key TEXT PRIMARY KEY, tokens REAL NOT NULL, at REAL NOT NULL)"
                )

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, isolation_level=None, timeout=10)
            retry_while_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
            db.execute("PRAGMA synchronous=OFF")
            self._local.db = db
        return db

    def share_with(self, replicas: int) -> None:
        """This replica's share when `replicas` replicas serve (a burst of 1 at least)."""
        self.rate = self.fleet_rate / replicas
        self.burst = max(1.0, self.fleet_burst / replicas)

    def wait_needed(self, key: str) -> float:
        """Takes a token and returns 0, or returns the seconds until one is free."""
        if self.rate <= 0:
            return 0.0
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # one worker at a time reads and writes a bucket
        try:
            now = self._clock()
            row = db.execute("SELECT tokens, at FROM buckets WHERE key = ?", (key,)).fetchone()
            tokens, at = row if row else (self.burst, now)
            tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            db.execute(
                "INSERT OR REPLACE INTO buckets (key, tokens, at) VALUES (?, ?, ?)",
                (key, tokens - 1 if wait == 0 else tokens, now),
            )
            if row is None:
                self._prune(db, now)
        finally:
            db.execute("COMMIT")
        return wait

    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        (count,) = db.execute("SELECT count(*) FROM buckets").fetchone()
        if count > self.PRUNE_AT:
            db.execute(
                "DELETE FROM buckets WHERE tokens + (? - at) * ? >= ?",
                (now, self.rate, self.burst),
            )

    def buckets(self) -> set[str]:
        return {key for (key,) in self._db().execute("SELECT key FROM buckets")}
