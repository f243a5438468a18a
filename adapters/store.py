"""Durable state on SQLAlchemy Core: tenants, heads, their examples and cached embeddings.

One code path for both engines: SQLite (a file in the data directory, the default) and
PostgreSQL (`GRAFT_DATABASE_URL=postgresql+psycopg://…`, for a fleet of replicas). The
schema is Alembic's (`adapters/migrations`); opening a store brings it to the latest
revision, one process at a time.

Every function that touches a head takes the tenant id and filters by it, so a caller
cannot reach another tenant's head by id. A head version is written in one transaction
(weights, labels, metrics and the examples it was trained on), so it is stored whole or
not at all, and a commit is durable before it returns (SQLite: WAL with synchronous=FULL;
PostgreSQL: its default synchronous_commit).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

metadata = sa.MetaData()

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("key_salt", sa.LargeBinary, nullable=False),
    sa.Column("key_hash", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
)
heads = sa.Table(
    "heads",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column(
        "tenant_id", sa.Text, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("backbone", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("labels", sa.Text, nullable=False, server_default="[]"),
    sa.Column("weights", sa.LargeBinary),
    sa.Column("bias", sa.LargeBinary),
    sa.Column("prototypes", sa.LargeBinary),
    sa.Column("unknown_threshold", sa.Float),
    sa.Column("label_descriptions", sa.Text, nullable=False, server_default="{}"),
    # Fine-tuning (migration 0006): asked for at creation, and the version's top.
    sa.Column("fine_tune", sa.Text, nullable=False, server_default="off"),
    sa.Column("top_factors", sa.LargeBinary),  # an .npz of fp16 LoRA factors
    sa.Column("metrics", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Text, nullable=False),
    sa.Index("heads_by_tenant", "tenant_id", "created_at"),
)
# Embeddings by content hash, per tenant: retraining never re-runs the backbone on an
# input this tenant has sent before, and no tenant's cache is visible to another.
embeddings = sa.Table(
    "embeddings",
    metadata,
    sa.Column(
        "tenant_id",
        sa.Text,
        sa.ForeignKey("tenants.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("backbone", sa.Text, primary_key=True),
    sa.Column("content_hash", sa.Text, primary_key=True),
    sa.Column("vector", sa.LargeBinary, nullable=False),
)
# Each example's input as sent, per tenant, for heads that may fine-tune (migrations 0006,
# 0007): a fine-tuned head's top is tuned on its inputs again at every version.
example_inputs = sa.Table(
    "example_inputs",
    metadata,
    sa.Column(
        "tenant_id",
        sa.Text,
        sa.ForeignKey("tenants.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("content_hash", sa.Text, primary_key=True),
    # An image's bytes; a text as UTF-8 (as job examples: PostgreSQL's text holds no NUL,
    # which a text may).
    sa.Column("data", sa.LargeBinary, nullable=False),
)
# The training set of each head's current version.
head_examples = sa.Table(
    "head_examples",
    metadata,
    sa.Column("head_id", sa.Text, sa.ForeignKey("heads.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("content_hash", sa.Text, primary_key=True),
    sa.Column("label", sa.Text, primary_key=True),
)
# The unlabelled examples of each head's current version (migration 0005): inputs of the
# domain the head will serve, which its training adapts to (adapters/adaptation.py).
head_unlabeled = sa.Table(
    "head_unlabeled",
    metadata,
    sa.Column("head_id", sa.Text, sa.ForeignKey("heads.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("content_hash", sa.Text, primary_key=True),
)
# One row: a count of the writes that cached copies must see (adapters/coherence.py).
changes = sa.Table(
    "changes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("count", sa.BigInteger, nullable=False),
)

# Training jobs (migration 0003): what a training needs beyond what is stored, and a lease
# that says which process trains it.
training_jobs = sa.Table(
    "training_jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column(
        "tenant_id", sa.Text, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("head_id", sa.Text, sa.ForeignKey("heads.id", ondelete="CASCADE"), nullable=False),
    sa.Column("backbones", sa.Text, nullable=False),  # JSON: the backbones it may choose
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("lease_owner", sa.Text),
    sa.Column("lease_until", sa.Float),  # Unix time
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # JSON {"stage", "done", "total"} while it runs (migration 0008).
    sa.Column("progress", sa.Text),
    sa.Index("training_jobs_by_head", "head_id", "created_at"),
)
job_examples = sa.Table(
    "job_examples",
    metadata,
    sa.Column(
        "job_id",
        sa.Text,
        sa.ForeignKey("training_jobs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("label", sa.Text),  # NULL: an unlabelled example (migration 0005)
    sa.Column("kind", sa.Text, nullable=False),  # "image" or "text" (UTF-8)
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# The replicas alive (migration 0004): a heartbeat each, written by its runner.
replicas = sa.Table(
    "replicas",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("seen_at", sa.Float, nullable=False),  # Unix time
)

KEY_PREFIX = "graft"
# How long opening waits for other processes that open the same new store at once.
OPEN_TIMEOUT_S = 30
INTERRUPTED = "training was interrupted by a restart; post the examples again"
# A job whose process died this many times is not tried again (its input may be the cause).
MAX_JOB_ATTEMPTS = 3
GAVE_UP = f"training stopped {MAX_JOB_ATTEMPTS} times with the process that ran it; not retried"


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
    fine_tune: str  # "auto", "on" or "off"
    metrics: dict[str, Any] | None
    error: str | None
    created_at: str
    updated_at: str
    progress: dict[str, Any] | None = None  # of its running training job, if any

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
            "fine_tune": self.fine_tune,
            "status": self.status,
            "version": self.version,
            "metrics": self.metrics,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "error": self.error,
            "progress": self.progress if self.status == "training" else None,
        }


@dataclass(frozen=True)
class Job:
    """A training job, as the process that claimed it sees it."""

    id: str
    tenant_id: str
    head_id: str
    backbones: list[str]
    attempts: int


@dataclass(frozen=True)
class ServingRow:
    """What serving needs of a head; the arrays are None when it has no trained version."""

    backbone: str
    status: str
    version: int
    labels: list[str]
    weights: np.ndarray | None
    bias: np.ndarray | None
    prototypes: np.ndarray | None
    unknown_threshold: float | None
    top_factors: list[np.ndarray] | None  # a fine-tuned head's (fp16), else None


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


class Store:
    def __init__(self, url: str | Path) -> None:
        from adapters.migrations import upgrade

        self.engine = open_engine(database_url(url))
        self._writer = self.engine.execution_options(graft_write=True)
        upgrade(self._writer)
        self._postgres = self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    def _tx(self) -> sa.engine.base.Connection:
        """`with store._tx() as db:` one write transaction, rolled back on error."""
        return self._writer.begin()

    def _read(self) -> sa.engine.base.Connection:
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
            return db.scalar(_CHANGE_COUNT)

    def head_versions(self, head_ids: Iterable[str]) -> dict[str, int]:
        """The current version of each of these heads that still exists."""
        ids = list(head_ids)
        found: dict[str, int] = {}
        with self._read() as db:
            for start in range(0, len(ids), 500):  # stay under SQLite's variable limit
                query = sa.select(heads.c.id, heads.c.version).where(
                    heads.c.id.in_(ids[start : start + 500])
                )
                found.update({head_id: version for head_id, version in db.execute(query)})
        return found

    def _insert_ignoring_duplicates(self, table: sa.Table):
        dialect = postgresql if self._postgres else sqlite
        return dialect.insert(table).on_conflict_do_nothing()

    # Tenants -------------------------------------------------------------------------

    def create_tenant(self, *, name: str) -> tuple[Tenant, str]:
        """A new tenant and its API key; the key is returned once and stored only hashed."""
        tenant = Tenant(id=uuid.uuid4().hex, name=name, created_at=_now())
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._tx() as db:
            db.execute(
                tenants.insert().values(
                    id=tenant.id,
                    name=name,
                    key_salt=salt,
                    key_hash=_hash_secret(salt, secret),
                    created_at=tenant.created_at,
                )
            )
        return tenant, f"{KEY_PREFIX}_{tenant.id}_{secret}"

    def list_tenants(self) -> list[Tenant]:
        query = sa.select(tenants.c.id, tenants.c.name, tenants.c.created_at).order_by(
            tenants.c.created_at
        )
        with self._read() as db:
            return [Tenant(*row) for row in db.execute(query)]

    def delete_tenant(self, *, tenant_id: str) -> bool:
        """Removes the tenant, its heads, their examples and its cached embeddings."""
        with self._tx() as db:
            deleted = db.execute(tenants.delete().where(tenants.c.id == tenant_id)).rowcount > 0
            if deleted:
                self._changed(db)
            return deleted

    def rotate_key(self, *, tenant_id: str) -> str | None:
        """A new API key for the tenant; the old one stops working at once."""
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._tx() as db:
            result = db.execute(
                tenants.update()
                .where(tenants.c.id == tenant_id)
                .values(key_salt=salt, key_hash=_hash_secret(salt, secret))
            )
            if result.rowcount == 0:
                return None
            self._changed(db)
        return f"{KEY_PREFIX}_{tenant_id}_{secret}"

    def authenticate(self, *, api_key: str) -> Tenant | None:
        prefix, _, rest = api_key.partition("_")
        tenant_id, _, secret = rest.partition("_")
        if prefix != KEY_PREFIX or not tenant_id or not secret:
            return None
        with self._read() as db:
            row = db.execute(_TENANT_KEY, {"tenant_id": tenant_id}).first()
        if row is None or not hmac.compare_digest(_hash_secret(row[3], secret), bytes(row[4])):
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
        fine_tune: str = "off",
        max_heads: int | None = None,
    ) -> Head | None:
        """A new head in `training` state; None if the tenant already has `max_heads`."""
        now = _now()
        head_id = uuid.uuid4().hex
        with self._tx() as db:
            if max_heads is not None:
                # Counted in the insert's transaction, under a lock on the tenant's row
                # (SQLite: the database's write lock), so concurrent creates on any replica
                # cannot overshoot.
                db.execute(
                    sa.select(tenants.c.id).where(tenants.c.id == tenant_id).with_for_update()
                )
                count = db.scalar(
                    sa.select(sa.func.count())
                    .select_from(heads)
                    .where(heads.c.tenant_id == tenant_id)
                )
                if count >= max_heads:
                    return None
            db.execute(
                heads.insert().values(
                    id=head_id,
                    tenant_id=tenant_id,
                    name=name,
                    backbone=backbone,
                    status="training",
                    label_descriptions=json.dumps(label_descriptions or {}),
                    fine_tune=fine_tune,
                    created_at=now,
                    updated_at=now,
                )
            )
        head = self.get_head(tenant_id=tenant_id, head_id=head_id)
        assert head is not None
        return head

    def get_head(self, *, tenant_id: str, head_id: str) -> Head | None:
        query = sa.select(*_HEAD_COLUMNS).where(
            heads.c.id == head_id, heads.c.tenant_id == tenant_id
        )
        with self._read() as db:
            row = db.execute(query).first()
        return _head_from_row(row) if row else None

    def serving_head(self, *, tenant_id: str, head_id: str) -> ServingRow | None:
        """What serving needs of a head, in one indexed read."""
        with self._read() as db:
            row = db.execute(_SERVING_HEAD, {"head_id": head_id, "tenant_id": tenant_id}).first()
        if row is None:
            return None
        backbone, status, version, labels, weights, bias, prototypes, threshold, top = row
        if weights is None:
            return ServingRow(backbone, status, version, [], None, None, None, None, None)
        w, b, p = _head_arrays(weights, bias, prototypes)
        return ServingRow(
            backbone, status, version, json.loads(labels), w, b, p, threshold, _factors(top)
        )

    def list_heads(self, *, tenant_id: str) -> list[Head]:
        query = (
            sa.select(*_HEAD_COLUMNS)
            .where(heads.c.tenant_id == tenant_id)
            .order_by(heads.c.created_at, heads.c.id)
        )
        with self._read() as db:
            return [_head_from_row(row) for row in db.execute(query)]

    def heads_per_backbone(self) -> dict[str, int]:
        """How many heads, of every tenant, sit on each backbone (an operator's check at
        start, never a tenant's answer)."""
        query = sa.select(heads.c.backbone, sa.func.count()).group_by(heads.c.backbone)
        with self._read() as db:
            return {backbone: count for backbone, count in db.execute(query)}

    def delete_head(self, *, tenant_id: str, head_id: str) -> bool:
        with self._tx() as db:
            result = db.execute(
                heads.delete().where(heads.c.id == head_id, heads.c.tenant_id == tenant_id)
            )
            if result.rowcount == 0:
                return False
            self._changed(db)
            return True

    def set_status(
        self, *, tenant_id: str, head_id: str, status: str, error: str | None = None
    ) -> None:
        with self._tx() as db:
            db.execute(
                heads.update()
                .where(heads.c.id == head_id, heads.c.tenant_id == tenant_id)
                .values(status=status, error=error, updated_at=_now())
            )

    def recover_interrupted(self) -> int:
        """Heads left `training` with no job to finish them (written by a Graft from before
        jobs were rows) are resolved: a head with a stored version goes back to serving
        it; one without fails."""
        no_job = ~sa.exists().where(training_jobs.c.head_id == heads.c.id)
        with self._tx() as db:
            return self._resolve_heads(db, INTERRUPTED, heads.c.status == "training", no_job)

    # Examples and embeddings ------------------------------------------------------------

    def cached_embeddings(
        self, *, tenant_id: str, backbone: str, content_hashes: Iterable[str]
    ) -> dict[str, np.ndarray]:
        hashes = list(set(content_hashes))
        found: dict[str, np.ndarray] = {}
        with self._read() as db:
            for start in range(0, len(hashes), 500):  # stay under SQLite's variable limit
                rows = db.execute(
                    sa.select(embeddings.c.content_hash, embeddings.c.vector).where(
                        embeddings.c.tenant_id == tenant_id,
                        embeddings.c.backbone == backbone,
                        embeddings.c.content_hash.in_(hashes[start : start + 500]),
                    )
                )
                found.update({h: np.frombuffer(v, dtype=np.float32) for h, v in rows})
        return found

    def example_keys(self, *, tenant_id: str, head_id: str) -> set[tuple[str, str]]:
        """(content_hash, label) of every example of the head's current version."""
        query = (
            sa.select(head_examples.c.content_hash, head_examples.c.label)
            .join(heads, heads.c.id == head_examples.c.head_id)
            .where(head_examples.c.head_id == head_id, heads.c.tenant_id == tenant_id)
        )
        with self._read() as db:
            return {tuple(row) for row in db.execute(query)}

    def unlabeled_keys(self, *, tenant_id: str, head_id: str) -> set[str]:
        """Content hashes of the unlabelled examples of the head's current version."""
        query = (
            sa.select(head_unlabeled.c.content_hash)
            .join(heads, heads.c.id == head_unlabeled.c.head_id)
            .where(head_unlabeled.c.head_id == head_id, heads.c.tenant_id == tenant_id)
        )
        with self._read() as db:
            return set(db.scalars(query))

    def training_set(self, *, tenant_id: str, head_id: str) -> list[tuple[str, str, np.ndarray]]:
        """(content_hash, label, embedding) of every example of the head's current version,
        in a fixed order (by content hash: the same on either engine)."""
        query = (
            sa.select(head_examples.c.content_hash, head_examples.c.label, embeddings.c.vector)
            .join(heads, heads.c.id == head_examples.c.head_id)
            .join(
                embeddings,
                (embeddings.c.tenant_id == heads.c.tenant_id)
                & (embeddings.c.backbone == heads.c.backbone)
                & (embeddings.c.content_hash == head_examples.c.content_hash),
            )
            .where(head_examples.c.head_id == head_id, heads.c.tenant_id == tenant_id)
            .order_by(head_examples.c.content_hash, head_examples.c.label)
        )
        with self._read() as db:
            rows = db.execute(query).all()
        return [(h, label, np.frombuffer(v, dtype=np.float32)) for h, label, v in rows]

    def inputs(self, *, tenant_id: str, content_hashes: Iterable[str]) -> dict[str, bytes]:
        """The kept inputs of these content hashes (those the tenant sent): image bytes, or
        a text as UTF-8."""
        hashes = list(content_hashes)
        found: dict[str, bytes] = {}
        with self._read() as db:
            for start in range(0, len(hashes), 500):  # bounded IN lists
                query = sa.select(example_inputs.c.content_hash, example_inputs.c.data).where(
                    example_inputs.c.tenant_id == tenant_id,
                    example_inputs.c.content_hash.in_(hashes[start : start + 500]),
                )
                found.update((h, data) for h, data in db.execute(query))
        return found

    def unlabeled_set(self, *, tenant_id: str, head_id: str) -> list[tuple[str, np.ndarray]]:
        """(content_hash, embedding) of every unlabelled example of the head's current
        version, by content hash."""
        query = (
            sa.select(head_unlabeled.c.content_hash, embeddings.c.vector)
            .join(heads, heads.c.id == head_unlabeled.c.head_id)
            .join(
                embeddings,
                (embeddings.c.tenant_id == heads.c.tenant_id)
                & (embeddings.c.backbone == heads.c.backbone)
                & (embeddings.c.content_hash == head_unlabeled.c.content_hash),
            )
            .where(head_unlabeled.c.head_id == head_id, heads.c.tenant_id == tenant_id)
            .order_by(head_unlabeled.c.content_hash)
        )
        with self._read() as db:
            rows = db.execute(query).all()
        return [(h, np.frombuffer(v, dtype=np.float32)) for h, v in rows]

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
        unlabeled: Iterable[str] = (),
        top_factors: list[np.ndarray] | None = None,
        inputs: dict[str, bytes] | None = None,
        ready: bool = True,
    ) -> int | None:
        """Stores a trained version atomically: its number, or None if the head was deleted
        meanwhile. `backbone` is the one the version was trained on (an `auto` head's
        choice). With `ready=False` the head stays `training` until `finish_job`: serving
        takes the version at once, clients are told it is ready once every cache has it."""
        with self._tx() as db:
            result = db.execute(
                heads.update()
                .where(heads.c.id == head_id, heads.c.tenant_id == tenant_id)
                .values(
                    status="ready" if ready else heads.c.status,
                    error=None,
                    version=heads.c.version + 1,
                    backbone=backbone,
                    labels=json.dumps(labels),
                    weights=_blob(weights),
                    bias=_blob(bias),
                    prototypes=_blob(prototypes),
                    unknown_threshold=unknown_threshold,
                    top_factors=None if top_factors is None else _npz(top_factors),
                    metrics=json.dumps(metrics),
                    updated_at=_now(),
                )
            )
            if result.rowcount == 0:
                return None
            if new_embeddings:
                db.execute(
                    self._insert_ignoring_duplicates(embeddings),
                    [
                        {"tenant_id": tenant_id, "backbone": backbone, "content_hash": h,
                         "vector": _blob(v)}
                        for h, v in new_embeddings.items()
                    ],
                )  # fmt: skip
            if examples:
                db.execute(
                    self._insert_ignoring_duplicates(head_examples),
                    [{"head_id": head_id, "content_hash": h, "label": label}
                     for h, label in examples],
                )  # fmt: skip
            if inputs:
                db.execute(
                    self._insert_ignoring_duplicates(example_inputs),
                    [{"tenant_id": tenant_id, "content_hash": h, "data": data}
                     for h, data in inputs.items()],
                )  # fmt: skip
            unlabeled = list(unlabeled)
            if unlabeled:
                db.execute(
                    self._insert_ignoring_duplicates(head_unlabeled),
                    [{"head_id": head_id, "content_hash": h} for h in unlabeled],
                )
            self._changed(db)
            return db.scalar(sa.select(heads.c.version).where(heads.c.id == head_id))

    # Replicas -------------------------------------------------------------------------

    def heartbeat(self, *, replica_id: str) -> None:
        dialect = postgresql if self._postgres else sqlite
        now = time.time()
        insert = dialect.insert(replicas).values(id=replica_id, seen_at=now)
        with self._tx() as db:
            db.execute(insert.on_conflict_do_update(index_elements=["id"], set_={"seen_at": now}))

    def live_replicas(self, *, within_s: float) -> int:
        """Replicas whose heartbeat is at most `within_s` old (this one at least)."""
        query = sa.select(sa.func.count()).where(replicas.c.seen_at > time.time() - within_s)
        with self._read() as db:
            return max(1, db.scalar(query.select_from(replicas)))

    # Training jobs --------------------------------------------------------------------

    def create_job(
        self,
        *,
        tenant_id: str,
        head_id: str,
        backbones: list[str],
        examples: list[tuple[str | None, str, bytes]],
        owner: str,
        lease_s: float,
    ) -> tuple[str, bool] | None:
        """Stores a training job with its new examples (label, or None for an unlabelled
        one; kind; data) and marks the head `training`, in one transaction: once this
        returns, a crash loses nothing. The job is claimed for `owner` unless the head has
        other jobs (a head trains one job at a time, oldest first). (job id, claimed); None
        if the head is gone."""
        job_id = uuid.uuid4().hex
        now = time.time()
        with self._tx() as db:
            # First: on PostgreSQL this locks the head's row, so concurrent jobs of one
            # head see each other.
            marked = db.execute(
                heads.update()
                .where(heads.c.id == head_id, heads.c.tenant_id == tenant_id)
                .values(status="training", error=None, updated_at=_now())
            )
            if marked.rowcount == 0:
                return None
            claimed = not db.scalar(
                sa.select(sa.func.count())
                .select_from(training_jobs)
                .where(training_jobs.c.head_id == head_id)
            )
            db.execute(
                training_jobs.insert().values(
                    id=job_id,
                    tenant_id=tenant_id,
                    head_id=head_id,
                    backbones=json.dumps(backbones),
                    created_at=_now(),
                    lease_owner=owner if claimed else None,
                    lease_until=now + lease_s if claimed else None,
                    attempts=1 if claimed else 0,
                )
            )
            if examples:
                db.execute(
                    job_examples.insert(),
                    [
                        {"job_id": job_id, "position": i, "label": label, "kind": kind,
                         "data": data}
                        for i, (label, kind, data) in enumerate(examples)
                    ],
                )  # fmt: skip
        return job_id, claimed

    def claim_job(self, *, owner: str, lease_s: float) -> Job | None:
        """The oldest job that no process holds (never claimed, or its lease ran out: its
        process died) and that is the oldest of its head, now leased to `owner`. A job
        claimed for the MAX_JOB_ATTEMPTS+1-th time fails its head instead."""
        now = time.time()
        older = training_jobs.alias("older")
        free = (
            sa.select(training_jobs)
            .where(
                sa.or_(training_jobs.c.lease_until.is_(None), training_jobs.c.lease_until < now),
                ~sa.exists().where(
                    older.c.head_id == training_jobs.c.head_id,
                    sa.tuple_(older.c.created_at, older.c.id)
                    < sa.tuple_(training_jobs.c.created_at, training_jobs.c.id),
                ),
            )
            .order_by(training_jobs.c.created_at, training_jobs.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)  # replicas claiming at once take different jobs
        )
        with self._tx() as db:
            row = db.execute(free).first()
            if row is None:
                return None
            attempts = row.attempts + 1
            job = Job(row.id, row.tenant_id, row.head_id, json.loads(row.backbones), attempts)
            if job.attempts > MAX_JOB_ATTEMPTS:
                self._resolve_heads(db, GAVE_UP, heads.c.id == job.head_id)
                db.execute(training_jobs.delete().where(training_jobs.c.id == job.id))
                return None
            db.execute(
                training_jobs.update()
                .where(training_jobs.c.id == job.id)
                .values(
                    # A dead process's progress is stale: the new one starts over.
                    lease_owner=owner,
                    lease_until=now + lease_s,
                    attempts=job.attempts,
                    progress=None,
                )
            )
        return job

    def job_examples(self, *, job_id: str) -> list[tuple[str | None, str, bytes]]:
        """(label, kind, data) of the job's new examples, in the order they were sent; an
        unlabelled one has the label None."""
        query = (
            sa.select(job_examples.c.label, job_examples.c.kind, job_examples.c.data)
            .where(job_examples.c.job_id == job_id)
            .order_by(job_examples.c.position)
        )
        with self._read() as db:
            return [(label, kind, bytes(data)) for label, kind, data in db.execute(query)]

    def set_progress(self, *, job_id: str, progress: dict[str, Any]) -> None:
        """How far the job is, for its head to show; written by the process training it."""
        with self._tx() as db:
            db.execute(
                training_jobs.update()
                .where(training_jobs.c.id == job_id)
                .values(progress=json.dumps(progress))
            )

    def renew_leases(self, *, owner: str, lease_s: float) -> None:
        with self._tx() as db:
            db.execute(
                training_jobs.update()
                .where(training_jobs.c.lease_owner == owner)
                .values(lease_until=time.time() + lease_s)
            )

    def release_leases(self, *, owner_prefix: str) -> int:
        """Jobs held by processes that are known to be gone (a replica's, as it starts
        again; a process's own, as it stops) are free for any process to take now."""
        with self._tx() as db:
            return db.execute(
                training_jobs.update()
                .where(training_jobs.c.lease_owner.startswith(owner_prefix, autoescape=True))
                .values(lease_owner=None, lease_until=None, progress=None)
            ).rowcount

    def release_job(self, *, job_id: str) -> None:
        """The job could not run for a passing reason of its process (the runner was
        restarting): free for any process again, the attempt not counted."""
        with self._tx() as db:
            db.execute(
                training_jobs.update()
                .where(training_jobs.c.id == job_id)
                .values(
                    lease_owner=None,
                    lease_until=None,
                    attempts=training_jobs.c.attempts - 1,
                    progress=None,
                )
            )

    def finish_job(self, *, job_id: str, tenant_id: str, head_id: str, version: int) -> None:
        """The job's version (saved with `ready=False`) is published: the head turns
        `ready`, unless a newer version was saved meanwhile, and the job is gone."""
        with self._tx() as db:
            db.execute(
                heads.update()
                .where(
                    heads.c.id == head_id,
                    heads.c.tenant_id == tenant_id,
                    heads.c.version == version,
                    heads.c.status == "training",
                )
                .values(status="ready", updated_at=_now())
            )
            db.execute(training_jobs.delete().where(training_jobs.c.id == job_id))

    def fail_job(self, *, job_id: str, tenant_id: str, head_id: str, error: str) -> None:
        """The job failed (not its process: it is not tried again); the head goes back to
        its last version, or fails if it has none."""
        with self._tx() as db:
            self._resolve_heads(db, error, heads.c.id == head_id, heads.c.tenant_id == tenant_id)
            db.execute(training_jobs.delete().where(training_jobs.c.id == job_id))

    @staticmethod
    def _resolve_heads(db: sa.Connection, error: str, *where: sa.ColumnElement) -> int:
        """The heads `where` selects go back to their last version, or fail if they have
        none, saying `error`."""
        return db.execute(
            heads.update()
            .where(*where)
            .values(
                status=sa.case((heads.c.version > 0, "ready"), else_="failed"),
                error=error,
                updated_at=_now(),
            )
        ).rowcount


_HEAD_COLUMNS = (
    *(
        heads.c[name]
        for name in (
            "id", "tenant_id", "name", "backbone", "status", "version", "labels", "weights",
            "bias", "prototypes", "unknown_threshold", "label_descriptions", "fine_tune",
            "metrics", "error", "created_at", "updated_at",
        )
    ),
    # The progress of the head's oldest job that reports one (the one running).
    sa.select(training_jobs.c.progress)
    .where(training_jobs.c.head_id == heads.c.id, training_jobs.c.progress.is_not(None))
    .order_by(training_jobs.c.created_at)
    .limit(1)
    .scalar_subquery()
    .label("progress"),
)  # fmt: skip
# The reads of a cold head and of a new key, built once (building a statement costs more
# than running it).
_SERVING_HEAD = sa.select(
    heads.c.backbone,
    heads.c.status,
    heads.c.version,
    heads.c.labels,
    heads.c.weights,
    heads.c.bias,
    heads.c.prototypes,
    heads.c.unknown_threshold,
    heads.c.top_factors,
).where(heads.c.id == sa.bindparam("head_id"), heads.c.tenant_id == sa.bindparam("tenant_id"))
_CHANGE_COUNT = sa.select(changes.c.count).where(changes.c.id == 1)
_TENANT_KEY = sa.select(
    tenants.c.id, tenants.c.name, tenants.c.created_at, tenants.c.key_salt, tenants.c.key_hash
).where(tenants.c.id == sa.bindparam("tenant_id"))


def _blob(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=np.float32).tobytes()


def _npz(factors: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *(np.asarray(f, np.float16) for f in factors))
    return buffer.getvalue()


def _factors(blob: bytes | None) -> list[np.ndarray] | None:
    """A head's stored top factors (fp16, in `factor_shapes` order), or None."""
    if blob is None:
        return None
    with np.load(io.BytesIO(blob)) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def _head_arrays(
    weights: bytes, bias: bytes, prototypes: bytes | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A head's stored blobs as its (embedding_dim, n_labels) weights, its bias and its
    class means (None for a version trained before heads kept them)."""
    b = np.frombuffer(bias, dtype=np.float32)
    w = np.frombuffer(weights, dtype=np.float32).reshape(-1, len(b))
    p = None if prototypes is None else np.frombuffer(prototypes, dtype=np.float32).reshape(w.shape)
    return w, b, p


def _head_from_row(row) -> Head:
    (head_id, tenant_id, name, backbone, status, version, labels, weights, bias, prototypes,
     threshold, descriptions, fine_tune, metrics, error, created_at, updated_at,
     progress) = row  # fmt: skip
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
        fine_tune=fine_tune,
        metrics=json.loads(metrics) if metrics else None,
        error=error,
        created_at=created_at,
        updated_at=updated_at,
        progress=json.loads(progress) if progress else None,
    )
