"""Durable state in one SQLite file: tenants, heads, their examples and cached embeddings.

Every function that touches a head takes the tenant id and filters by it, so a caller
cannot reach another tenant's head by id. A head version is written in one transaction
(weights, labels, metrics and the examples it was trained on), so it is stored whole or
not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_salt BLOB NOT NULL,
    key_hash BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS heads (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    backbone TEXT NOT NULL,
    status TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    labels TEXT NOT NULL DEFAULT '[]',
    weights BLOB,
    bias BLOB,
    prototypes BLOB,
    unknown_threshold REAL,
    label_descriptions TEXT NOT NULL DEFAULT '{}',
    metrics TEXT,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS heads_by_tenant ON heads(tenant_id, created_at);
-- Embeddings by content hash, per tenant: retraining never re-runs the backbone on an
-- input this tenant has sent before, and no tenant's cache is visible to another.
CREATE TABLE IF NOT EXISTS embeddings (
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    backbone TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (tenant_id, backbone, content_hash)
);
-- The training set of each head's current version.
CREATE TABLE IF NOT EXISTS head_examples (
    head_id TEXT NOT NULL REFERENCES heads(id) ON DELETE CASCADE,
    content_hash TEXT NOT NULL,
    label TEXT NOT NULL,
    PRIMARY KEY (head_id, content_hash, label)
);
"""

# Columns added to `heads` after its first release (SQLite adds them in place).
ADDED_HEAD_COLUMNS = {
    "prototypes": "BLOB",
    "unknown_threshold": "REAL",
    "label_descriptions": "TEXT NOT NULL DEFAULT '{}'",
}

KEY_PREFIX = "graft"
# How long opening waits for other processes that open the same new store at once.
OPEN_TIMEOUT_S = 30
INTERRUPTED = "training was interrupted by a restart; post the examples again"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _hash_secret(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: str

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": self.created_at}


@dataclass(frozen=True)
class Head:
    id: str
    tenant_id: str
    name: str
    backbone: str
    status: str
    version: int
    labels: list[str]
    weights: np.ndarray | None
    bias: np.ndarray | None
    prototypes: np.ndarray | None  # (embedding_dim, n_labels): normalised class means
    unknown_threshold: float | None
    label_descriptions: dict[str, str]
    metrics: dict[str, Any] | None
    error: str | None
    created_at: str
    updated_at: str

    @property
    def servable(self) -> bool:
        """A head serves its latest trained version, even while a newer one trains."""
        return self.weights is not None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "backbone": self.backbone,
            "labels": self.labels,
            "label_descriptions": self.label_descriptions,
            "status": self.status,
            "version": self.version,
            "metrics": self.metrics,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "error": self.error,
        }


@dataclass(frozen=True)
class ServingRow:
    """What serving needs of a head; the arrays are None when the caller's copy is current
    (or when the head has no trained version)."""

    backbone: str
    status: str
    version: int
    labels: list[str]
    weights: np.ndarray | None
    bias: np.ndarray | None
    prototypes: np.ndarray | None
    unknown_threshold: float | None


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        # Writes: one connection, serialised by a lock, each in one transaction. Reads: a
        # connection per thread, so they never wait behind a write's fsync (WAL lets
        # readers go on while one writer commits).
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._readers = threading.local()
        # The runner and every API worker open the store at once on a new data directory.
        # Turning on WAL upgrades a read lock to a write lock, which SQLite refuses at once
        # (no busy wait: it could deadlock) while another process does the same; the
        # steps are idempotent, so they are simply tried again.
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        while True:
            try:
                self._set_up()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _set_up(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before we answer, so an acknowledged head survives even
        # a power cut. Head writes are rare; the fsync costs nothing on the predict path.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Brings a data directory written by an older Graft up to this schema."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(heads)")}
        for column, declaration in ADDED_HEAD_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE heads ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Transaction(self._db, self._lock)

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """This thread's read-only connection, in one read transaction (a consistent view)."""
        db = getattr(self._readers, "db", None)
        if db is None:
            db = sqlite3.connect(
                f"file:{self._path}?mode=ro",
                uri=True,
                check_same_thread=False,
                isolation_level=None,
            )
            self._readers.db = db
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    # Tenants -------------------------------------------------------------------------

    def create_tenant(self, *, name: str) -> tuple[Tenant, str]:
        """A new tenant and its API key; the key is returned once and stored only hashed."""
        tenant = Tenant(id=uuid.uuid4().hex, name=name, created_at=_now())
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._tx() as db:
            db.execute(
                "INSERT INTO tenants (id, name, key_salt, key_hash, created_at) VALUES (?,?,?,?,?)",
                (tenant.id, name, salt, _hash_secret(salt, secret), tenant.created_at),
            )
        return tenant, f"{KEY_PREFIX}_{tenant.id}_{secret}"

    def list_tenants(self) -> list[Tenant]:
        with self._read() as db:
            rows = db.execute("SELECT id, name, created_at FROM tenants ORDER BY created_at")
            return [Tenant(*row) for row in rows]

    def delete_tenant(self, *, tenant_id: str) -> bool:
        """Removes the tenant, its heads, their examples and its cached embeddings."""
        with self._tx() as db:
            return db.execute("DELETE FROM tenants WHERE id = ?", (tenant_id,)).rowcount > 0

    def rotate_key(self, *, tenant_id: str) -> str | None:
        """A new API key for the tenant; the old one stops working at once."""
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE tenants SET key_salt = ?, key_hash = ? WHERE id = ?",
                (salt, _hash_secret(salt, secret), tenant_id),
            )
            if cursor.rowcount == 0:
                return None
        return f"{KEY_PREFIX}_{tenant_id}_{secret}"

    def authenticate(self, *, api_key: str) -> Tenant | None:
        prefix, _, rest = api_key.partition("_")
        tenant_id, _, secret = rest.partition("_")
        if prefix != KEY_PREFIX or not tenant_id or not secret:
            return None
        with self._read() as db:
            row = db.execute(
                "SELECT id, name, created_at, key_salt, key_hash FROM tenants WHERE id = ?",
                (tenant_id,),
            ).fetchone()
        if row is None or not hmac.compare_digest(_hash_secret(row[3], secret), row[4]):
            return None
        return Tenant(*row[:3])

    # Heads ---------------------------------------------------------------------------

    def create_head(
        self,
        *,
        tenant_id: str,
        name: str,
        backbone: str,
        label_descriptions: dict[str, str] | None = None,
        max_heads: int | None = None,
    ) -> Head | None:
        """A new head in `training` state; None if the tenant already has `max_heads`."""
        now = _now()
        head_id = uuid.uuid4().hex
        # Counted in the insert's transaction, so concurrent creates cannot overshoot.
        with self._tx() as db:
            if max_heads is not None:
                (count,) = db.execute(
                    "SELECT COUNT(*) FROM heads WHERE tenant_id = ?", (tenant_id,)
                ).fetchone()
                if count >= max_heads:
                    return None
            db.execute(
                "INSERT INTO heads (id, tenant_id, name, backbone, status, label_descriptions,"
                " created_at, updated_at) VALUES (?,?,?,?,'training',?,?,?)",
                (
                    head_id,
                    tenant_id,
                    name,
                    backbone,
                    json.dumps(label_descriptions or {}),
                    now,
                    now,
                ),
            )
        head = self.get_head(tenant_id=tenant_id, head_id=head_id)
        assert head is not None
        return head

    def get_head(self, *, tenant_id: str, head_id: str) -> Head | None:
        with self._read() as db:
            row = db.execute(
                f"SELECT {_HEAD_COLUMNS} FROM heads WHERE id = ? AND tenant_id = ?",
                (head_id, tenant_id),
            ).fetchone()
        return _head_from_row(row) if row else None

    def serving_head(
        self, *, tenant_id: str, head_id: str, known_version: int | None
    ) -> ServingRow | None:
        """One indexed read; the weights are sent only if `known_version` is not current."""
        with self._read() as db:
            row = db.execute(
                "SELECT backbone, status, version, labels,"
                " CASE WHEN version IS ? THEN NULL ELSE weights END,"
                " CASE WHEN version IS ? THEN NULL ELSE bias END,"
                " CASE WHEN version IS ? THEN NULL ELSE prototypes END, unknown_threshold"
                " FROM heads WHERE id = ? AND tenant_id = ?",
                (known_version, known_version, known_version, head_id, tenant_id),
            ).fetchone()
        if row is None:
            return None
        backbone, status, version, labels, weights, bias, prototypes, threshold = row
        if weights is None:
            return ServingRow(backbone, status, version, [], None, None, None, None)
        w, b, p = _head_arrays(weights, bias, prototypes)
        return ServingRow(backbone, status, version, json.loads(labels), w, b, p, threshold)

    def list_heads(self, *, tenant_id: str) -> list[Head]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_HEAD_COLUMNS} FROM heads WHERE tenant_id = ? ORDER BY created_at",
                (tenant_id,),
            ).fetchall()
        return [_head_from_row(row) for row in rows]

    def delete_head(self, *, tenant_id: str, head_id: str) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                "DELETE FROM heads WHERE id = ? AND tenant_id = ?", (head_id, tenant_id)
            )
            return cursor.rowcount > 0

    def set_status(
        self, *, tenant_id: str, head_id: str, status: str, error: str | None = None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE heads SET status = ?, error = ?, updated_at = ?"
                " WHERE id = ? AND tenant_id = ?",
                (status, error, _now(), head_id, tenant_id),
            )

    def recover_interrupted(self) -> int:
        """After a restart, no training is running: heads left `training` are resolved.

        A head with a stored version goes back to serving it; one without fails.
        """
        with self._tx() as db:
            return db.execute(
                "UPDATE heads SET status = CASE WHEN version > 0 THEN 'ready' ELSE 'failed' END,"
                " error = ?, updated_at = ? WHERE status = 'training'",
                (INTERRUPTED, _now()),
            ).rowcount

    # Examples and embeddings ------------------------------------------------------------

    def cached_embeddings(
        self, *, tenant_id: str, backbone: str, content_hashes: Iterable[str]
    ) -> dict[str, np.ndarray]:
        hashes = list(set(content_hashes))
        found: dict[str, np.ndarray] = {}
        with self._read() as db:
            for start in range(0, len(hashes), 500):  # stay under SQLite's variable limit
                chunk = hashes[start : start + 500]
                rows = db.execute(
                    "SELECT content_hash, vector FROM embeddings WHERE tenant_id = ? AND"
                    f" backbone = ? AND content_hash IN ({','.join('?' * len(chunk))})",
                    (tenant_id, backbone, *chunk),
                )
                found.update({h: np.frombuffer(v, dtype=np.float32) for h, v in rows})
        return found

    def example_keys(self, *, tenant_id: str, head_id: str) -> set[tuple[str, str]]:
        """(content_hash, label) of every example of the head's current version."""
        with self._read() as db:
            rows = db.execute(
                "SELECT x.content_hash, x.label FROM head_examples x"
                " JOIN heads h ON h.id = x.head_id WHERE x.head_id = ? AND h.tenant_id = ?",
                (head_id, tenant_id),
            ).fetchall()
        return set(rows)

    def training_set(self, *, tenant_id: str, head_id: str) -> list[tuple[str, str, np.ndarray]]:
        """(content_hash, label, embedding) of every example of the head's current version."""
        with self._read() as db:
            rows = db.execute(
                "SELECT x.content_hash, x.label, e.vector FROM head_examples x"
                " JOIN heads h ON h.id = x.head_id"
                " JOIN embeddings e ON e.tenant_id = h.tenant_id AND e.backbone = h.backbone"
                "  AND e.content_hash = x.content_hash"
                " WHERE x.head_id = ? AND h.tenant_id = ? ORDER BY x.rowid",
                (head_id, tenant_id),
            ).fetchall()
        return [(h, label, np.frombuffer(v, dtype=np.float32)) for h, label, v in rows]

    def save_version(
        self,
        *,
        tenant_id: str,
        head_id: str,
        backbone: str,
        new_embeddings: dict[str, np.ndarray],
        examples: list[tuple[str, str]],
        labels: list[str],
        weights: np.ndarray,
        bias: np.ndarray,
        prototypes: np.ndarray,
        unknown_threshold: float | None,
        metrics: dict[str, Any],
    ) -> bool:
        """Stores a trained version atomically; False if the head was deleted meanwhile.
        `backbone` is the one the version was trained on (an `auto` head's choice)."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE heads SET status = 'ready', error = NULL, version = version + 1,"
                " backbone = ?, labels = ?, weights = ?, bias = ?, prototypes = ?,"
                " unknown_threshold = ?, metrics = ?, updated_at = ?"
                " WHERE id = ? AND tenant_id = ?",
                (
                    backbone,
                    json.dumps(labels),
                    np.ascontiguousarray(weights, dtype=np.float32).tobytes(),
                    np.ascontiguousarray(bias, dtype=np.float32).tobytes(),
                    np.ascontiguousarray(prototypes, dtype=np.float32).tobytes(),
                    unknown_threshold,
                    json.dumps(metrics),
                    _now(),
                    head_id,
                    tenant_id,
                ),
            )
            if cursor.rowcount == 0:
                return False
            db.executemany(
                "INSERT OR IGNORE INTO embeddings (tenant_id, backbone, content_hash, vector)"
                " VALUES (?,?,?,?)",
                [
                    (tenant_id, backbone, h, np.asarray(v, dtype=np.float32).tobytes())
                    for h, v in new_embeddings.items()
                ],
            )
            db.executemany(
                "INSERT OR IGNORE INTO head_examples (head_id, content_hash, label) VALUES (?,?,?)",
                [(head_id, h, label) for h, label in examples],
            )
            return True


_HEAD_COLUMNS = (
    "id, tenant_id, name, backbone, status, version, labels, weights, bias, prototypes,"
    " unknown_threshold, label_descriptions, metrics, error, created_at, updated_at"
)


def _head_arrays(
    weights: bytes, bias: bytes, prototypes: bytes | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A head's stored blobs as its (embedding_dim, n_labels) weights, its bias and its
    class means (None for a version trained before heads kept them)."""
    b = np.frombuffer(bias, dtype=np.float32)
    w = np.frombuffer(weights, dtype=np.float32).reshape(-1, len(b))
    p = None if prototypes is None else np.frombuffer(prototypes, dtype=np.float32).reshape(w.shape)
    return w, b, p


def _head_from_row(row: tuple) -> Head:
    (head_id, tenant_id, name, backbone, status, version, labels, weights, bias, prototypes,
     threshold, descriptions, metrics, error, created_at, updated_at) = row  # fmt: skip
    label_list = json.loads(labels)
    w, b, p = _head_arrays(weights, bias, prototypes) if weights is not None else (None,) * 3
    return Head(
        id=head_id,
        tenant_id=tenant_id,
        name=name,
        backbone=backbone,
        status=status,
        version=version,
        labels=label_list,
        weights=w,
        bias=b,
        prototypes=p,
        unknown_threshold=threshold,
        label_descriptions=json.loads(descriptions),
        metrics=json.loads(metrics) if metrics else None,
        error=error,
        created_at=created_at,
        updated_at=updated_at,
    )


class _Transaction:
    """`with store._tx() as db:` runs under the lock in one BEGIN…COMMIT, rolled back on error."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
