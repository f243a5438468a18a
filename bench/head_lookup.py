"""The head lookup on the predict path, on each storage issue 11 would serve it from.

    python bench/head_lookup.py            # about a minute

Every predict reads its head's row (`Store.serving_head`: one indexed read that returns
the weights only when the worker's cached copy is stale). Issue 11 moves the store onto
SQLAlchemy Core so that one code path serves SQLite and PostgreSQL, and asks that a
replica on PostgreSQL predict within 10% of one on SQLite. Side by side in one run, on
the same 1,000 heads (one per tenant, 1280 x 5 weights and class prototypes):

- Graft's store today: `sqlite3`, a read connection per thread;
- SQLAlchemy Core on the same SQLite file;
- SQLAlchemy Core on PostgreSQL 15 (Debian's, on loopback; `tests/postgres.py`);
- psycopg 3 alone on the same PostgreSQL (the server's share, without SQLAlchemy).

Each figure: microseconds per lookup, single-threaded, the median of three timings of
5,000 lookups of random heads; "current" (the cached copy is current: no weights sent,
every predict but the first) and "stale" (the weights sent).
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.store import Store  # noqa: E402
from tests.postgres import postgres  # noqa: E402

HEADS = 1000
LOOKUPS = 5000

metadata = sa.MetaData()
heads = sa.Table(
    "heads",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("backbone", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Column("weights", sa.LargeBinary),
    sa.Column("bias", sa.LargeBinary),
    sa.Column("prototypes", sa.LargeBinary),
    sa.Column("unknown_threshold", sa.Float),
)


def _unless_current(column: sa.Column) -> sa.ColumnElement:
    known = sa.bindparam("known", type_=sa.Integer)
    return sa.case((heads.c.version.is_not_distinct_from(known), sa.null()), else_=column)


# The store's query, in Core: one statement for both engines.
SERVING_HEAD = sa.select(
    heads.c.backbone,
    heads.c.status,
    heads.c.version,
    heads.c.labels,
    _unless_current(heads.c.weights),
    _unless_current(heads.c.bias),
    _unless_current(heads.c.prototypes),
    heads.c.unknown_threshold,
).where(heads.c.id == sa.bindparam("head_id"), heads.c.tenant_id == sa.bindparam("tenant_id"))

PSYCOPG_SERVING_HEAD = (
    "SELECT backbone, status, version, labels,"
    " CASE WHEN version IS NOT DISTINCT FROM %(known)s THEN NULL ELSE weights END,"
    " CASE WHEN version IS NOT DISTINCT FROM %(known)s THEN NULL ELSE bias END,"
    " CASE WHEN version IS NOT DISTINCT FROM %(known)s THEN NULL ELSE prototypes END,"
    " unknown_threshold FROM heads WHERE id = %(head_id)s AND tenant_id = %(tenant_id)s"
)


def seed(store: Store) -> list[tuple[str, str, int]]:
    """One trained head per tenant, written through the store: (tenant, head, version)."""
    rng = np.random.default_rng(0)
    found = []
    for i in range(HEADS):
        tenant, _ = store.create_tenant(name=f"t{i}")
        head = store.create_head(tenant_id=tenant.id, name="h", backbone="b", max_heads=10)
        store.save_version(
            tenant_id=tenant.id,
            head_id=head.id,
            backbone="efficientnet_lite0",
            new_embeddings={},
            examples=[],
            labels=[str(k) for k in range(5)],
            weights=rng.standard_normal((1280, 5)).astype(np.float32),
            bias=np.zeros(5, np.float32),
            prototypes=rng.standard_normal((1280, 5)).astype(np.float32),
            unknown_threshold=None,
            metrics={},
        )
        found.append((tenant.id, head.id, 1))
    return found


def timed(lookup: Callable[[str, str, int | None], object], keys, stale: bool) -> float:
    """Microseconds per lookup: the median of three timings."""
    rng = random.Random(1)
    picks = [rng.choice(keys) for _ in range(LOOKUPS)]
    for tenant, head, version in picks[:200]:  # warm connections and caches
        lookup(tenant, head, None if stale else version)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        for tenant, head, version in picks:
            row = lookup(tenant, head, None if stale else version)
            assert row is not None
        runs.append((time.perf_counter() - start) / LOOKUPS * 1e6)
    return statistics.median(runs)


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="graft-head-lookup-"))
    store = Store(scratch / "graft.db")
    keys = seed(store)

    def graft_store(tenant: str, head: str, known: int | None):
        return store.serving_head(tenant_id=tenant, head_id=head, known_version=known)

    def core(engine: sa.Engine):
        def lookup(tenant: str, head: str, known: int | None):
            with engine.connect() as conn:
                return conn.execute(
                    SERVING_HEAD, {"head_id": head, "tenant_id": tenant, "known": known}
                ).first()

        return lookup

    sqlite_engine = sa.create_engine(f"sqlite:///{scratch / 'graft.db'}")
    results: dict[str, tuple[float, float]] = {}
    with postgres() as url:
        pg_engine = sa.create_engine(url)
        metadata.create_all(pg_engine)
        with sqlite_engine.connect() as source, pg_engine.begin() as target:
            rows = [dict(r._mapping) for r in source.execute(sa.select(heads))]
            target.execute(sa.insert(heads), rows)
        with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as raw:
            raw.autocommit = True

            def psycopg_alone(tenant: str, head: str, known: int | None):
                return raw.execute(
                    PSYCOPG_SERVING_HEAD,
                    {"head_id": head, "tenant_id": tenant, "known": known},
                    prepare=True,
                ).fetchone()

            lookups = {
                "Graft's store (sqlite3)": graft_store,
                "SQLAlchemy Core, SQLite": core(sqlite_engine),
                "SQLAlchemy Core, PostgreSQL": core(pg_engine),
                "psycopg alone, PostgreSQL": psycopg_alone,
            }
            for name, lookup in lookups.items():
                results[name] = (timed(lookup, keys, False), timed(lookup, keys, True))
        pg_engine.dispose()
    sqlite_engine.dispose()
    store.close()

    print(f"# bench/head_lookup.py: {HEADS} heads, {LOOKUPS} lookups per timing")
    base_current, base_stale = results["Graft's store (sqlite3)"]
    print(f"{'':<30} {'current µs':>11} {'÷ sqlite3':>9} {'stale µs':>9} {'÷ sqlite3':>9}")
    for name, (current, stale) in results.items():
        print(
            f"{name:<30} {current:11.1f} {current / base_current:9.2f}"
            f" {stale:9.1f} {stale / base_stale:9.2f}"
        )


if __name__ == "__main__":
    main()
