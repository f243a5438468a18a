"""What a predict costs in registry reads, on SQLite and on PostgreSQL, side by side.

    python bench/head_lookup.py            # about a minute

Every predict needs its tenant (from the API key) and its head's weights. A worker keeps
both in its caches (`adapters/coherence.py`, `adapters/head_cache.py`), kept in step by
polling the store's change count, so a predict whose key and head are cached reads no
row. On the same 1,000 heads (one per tenant, 1280 x 5 weights and class prototypes), on
a SQLite file and on PostgreSQL 15 (Debian's, on loopback; `tests/postgres.py`):

- cached: the key and the head from the caches (every predict but a cold one);
- cold: `Store.authenticate` + `Store.serving_head` (a new key, a head not cached);
- poll: `Store.change_count`, which each process runs every GRAFT_CACHE_POLL_S;
- check: `HeadCache.revalidate` of the 1,000 cached heads (after any change anywhere).

Microseconds per operation, single-threaded, the median of three timings.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.coherence import KeyCache
from adapters.head_cache import HeadCache
from adapters.store import Store
from deploy.local_postgres import postgres

HEADS = 1000
LOOKUPS = 5000


def seed(store: Store) -> list[tuple[str, str, str]]:
    """One trained head per tenant: (tenant id, API key, head id)."""
    rng = np.random.default_rng(0)
    found = []
    for i in range(HEADS):
        tenant, key = store.create_tenant(name=f"t{i}")
        head = store.create_head(tenant_id=tenant.id, name="h", backbone="b")
        store.save_version(
            tenant_id=tenant.id, head_id=head.id, backbone="efficientnet_lite0",
            new_embeddings={}, examples=[], labels=[str(k) for k in range(5)],
            weights=rng.standard_normal((1280, 5)).astype(np.float32),
            bias=np.zeros(5, np.float32),
            prototypes=rng.standard_normal((1280, 5)).astype(np.float32),
            unknown_threshold=None, metrics={},
        )  # fmt: skip
        found.append((tenant.id, key, head.id))
    return found


def timed(operation: Callable[[], object], repeat: int) -> float:
    """Microseconds per call: the median of three timings of `repeat` calls."""
    for _ in range(min(repeat, 200)):
        operation()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            operation()
        runs.append((time.perf_counter() - start) / repeat * 1e6)
    return statistics.median(runs)


def measure(url: str | Path) -> dict[str, float]:
    store = Store(url)
    heads = seed(store)
    picks = iter(random.Random(1).choices(heads, k=10**7))
    keys, cache = KeyCache(store), HeadCache(store, max_bytes=10**9)

    def cached() -> None:
        tenant_id, key, head_id = next(picks)
        assert keys.authenticate(key) is not None
        assert cache.get(tenant_id=tenant_id, head_id=head_id) is not None

    def cold() -> None:
        tenant_id, key, head_id = next(picks)
        assert store.authenticate(api_key=key) is not None
        assert store.serving_head(tenant_id=tenant_id, head_id=head_id) is not None

    for tenant_id, key, head_id in heads:  # every key and head cached
        cached_tenant = keys.authenticate(key)
        assert cached_tenant and cache.get(tenant_id=tenant_id, head_id=head_id)
    results = {
        "cached": timed(cached, LOOKUPS),
        "cold": timed(cold, LOOKUPS),
        "poll": timed(store.change_count, LOOKUPS),
        "check": timed(cache.revalidate, 20),
    }
    assert len(cache) == HEADS  # nothing changed: the checks kept every head
    store.close()
    return results


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="graft-head-lookup-") as scratch:
        results = {"SQLite": measure(Path(scratch) / "graft.sqlite3")}
    with postgres() as url:
        results["PostgreSQL"] = measure(url)
    print(f"# bench/head_lookup.py: {HEADS} heads, µs per operation")
    print(f"{'':<12} {'cached':>8} {'cold':>8} {'poll':>8} {'check 1,000':>12}")
    for engine, r in results.items():
        print(
            f"{engine:<12} {r['cached']:8.1f} {r['cold']:8.1f} {r['poll']:8.1f} {r['check']:12.0f}"
        )


if __name__ == "__main__":
    main()
