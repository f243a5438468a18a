"""The store's engine: SQLite (durable and safe across processes) or PostgreSQL, and the
transactions its parts use."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from adapters.migrations import upgrade
from adapters.store.tables import changes

# How long opening waits for other processes that open the same new store at once.
OPEN_TIMEOUT_S = 30


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def database_url(url_or_path: str | Path) -> str:
    """A SQLAlchemy URL; a path stands for a SQLite file."""
    return f"sqlite:///{url_or_path}" if isinstance(url_or_path, Path) else url_or_path


def open_engine(url: str) -> sa.Engine:
    """An engine for `url`, set up for Graft's durability and concurrency on either engine."""
    if not url.startswith("sqlite"):
        # pool_pre_ping: a replica outlives a database restart or failover. At most 8
        # connections per process: warm requests read no row, so few are ever in use.
        return sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
    path = sa.engine.make_url(url).database
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url)

    @sa.event.listens_for(engine, "connect")
    def _set_up(dbapi_connection, _record) -> None:
        # The driver's own transaction handling is off; the "begin" hook below emits
        # BEGIN itself, so that every statement of a `with` block is one transaction.
        dbapi_connection.isolation_level = None
        dbapi_connection.execute(f"PRAGMA busy_timeout = {OPEN_TIMEOUT_S * 1000}")
        # FULL: a commit is on disk before we answer, so an acknowledged head survives
        # even a power cut. Head writes are rare; the fsync costs nothing when predicting.
        dbapi_connection.execute("PRAGMA synchronous = FULL")
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        retry_while_locked(lambda: dbapi_connection.execute("PRAGMA journal_mode = WAL"))

    @sa.event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        # Writers take the write lock up front (waiting on busy_timeout), so a transaction
        # that reads, then writes, never fails on a lock upgrade; readers never wait (WAL).
        write = connection.get_execution_options().get("graft_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def retry_while_locked(step) -> None:
    """The runner and every API worker open the store (and the rate buckets:
    service/limits.py) at once on a new data directory. Turning on WAL upgrades a read
    lock to a write lock, which SQLite refuses at once (no busy wait: it could deadlock)
    while another process does the same; the step is idempotent, so it is simply tried
    again."""
    import sqlite3

    deadline = time.monotonic() + OPEN_TIMEOUT_S
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Database:
    """The engine and the transactions every part of the store uses."""

    def __init__(self, url: str | Path) -> None:
        self.engine = open_engine(database_url(url))
        self._writer = self.engine.execution_options(graft_write=True)
        upgrade(self._writer)
        self._postgres = self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    def _tx(self) -> AbstractContextManager[sa.Connection]:
        """`with store._tx() as db:` one write transaction, rolled back on error."""
        return self._writer.begin()

    def _read(self) -> AbstractContextManager[sa.Connection]:
        """`with store._read() as db:` one read transaction (a consistent view on SQLite)."""
        return self.engine.begin()

    @staticmethod
    def _changed(db: sa.Connection) -> None:
        """Counts a write that every process's caches must see, in its transaction (last,
        so that the row lock is held only to the commit)."""
        db.execute(changes.update().where(changes.c.id == 1).values(count=changes.c.count + 1))

    def change_count(self) -> int:
        """How many such writes there have been: one tiny read, polled by every process."""
        with self._read() as db:
            return db.scalar(_CHANGE_COUNT) or 0

    def _insert_ignoring_duplicates(self, table: sa.Table):
        dialect = postgresql if self._postgres else sqlite
        return dialect.insert(table).on_conflict_do_nothing()


_CHANGE_COUNT = sa.select(changes.c.count).where(changes.c.id == 1)
