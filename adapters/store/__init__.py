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

The store is one class, `Store`, made of one part per idea: tenants and their keys
(tenants.py), heads and their versions (heads.py), examples and cached embeddings
(examples.py), the training job queue (jobs.py) and the replicas' heartbeats
(replicas.py), over one engine (engine.py) and one schema (tables.py).
"""

from __future__ import annotations

from adapters.store.engine import database_url, open_engine, retry_while_locked
from adapters.store.examples import Examples
from adapters.store.heads import INTERRUPTED, Heads
from adapters.store.jobs import GAVE_UP, MAX_JOB_ATTEMPTS, Jobs
from adapters.store.records import Head, Job, Lease, LeaseLost, ServingRow, Tenant
from adapters.store.replicas import Replicas
from adapters.store.tenants import KEY_PREFIX, Tenants

__all__ = [
    "GAVE_UP", "INTERRUPTED", "KEY_PREFIX", "MAX_JOB_ATTEMPTS", "Head", "Job", "Lease",
    "LeaseLost", "ServingRow", "Store", "Tenant", "database_url", "open_engine",
    "retry_while_locked",
]  # fmt: skip


class Store(Tenants, Heads, Examples, Jobs, Replicas):
    """Every read and write of Graft's durable state (`Store(url)` opens and migrates)."""
