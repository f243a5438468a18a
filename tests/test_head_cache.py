from __future__ import annotations

import time

import numpy as np
import pytest

from adapters.coherence import ChangeWatcher, KeyCache
from adapters.head_cache import HeadCache, Unservable
from adapters.store import Store


@pytest.fixture
def store(database_url):
    s = Store(database_url)
    yield s
    s.close()


def _trained_head(store, tenant_id, name="h", dim=64, fill=1.0):
    head = store.create_head(tenant_id=tenant_id, name=name, backbone="bb")
    _retrain(store, tenant_id, head.id, dim=dim, fill=fill)
    return head.id


def _retrain(store, tenant_id, head_id, dim=64, fill=1.0):
    store.save_version(
        tenant_id=tenant_id, head_id=head_id, backbone="bb", new_embeddings={}, examples=[],
        labels=["a", "b"], weights=np.full((dim, 2), fill, np.float32),
        bias=np.zeros(2, np.float32), prototypes=np.full((dim, 2), fill, np.float32),
        unknown_threshold=0.5, metrics={},
    )  # fmt: skip


def _within(seconds: float, condition) -> float:
    """Seconds until `condition()` held; fails if it did not within `seconds`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, "not seen in time"
        time.sleep(0.005)
    return time.monotonic() - start


def test_a_write_by_another_process_reaches_the_caches_within_a_poll(database_url) -> None:
    """Two stores on one database stand for two replicas: what one writes, the other's
    caches serve within about one poll, and never after its writer has seen its answer
    wait two polls."""
    writer, reader = Store(database_url), Store(database_url)
    cache, keys = HeadCache(reader, max_bytes=10**6), KeyCache(reader)
    watcher = ChangeWatcher(reader, interval_s=0.05, caches=[cache, keys])
    try:
        tenant, key = writer.create_tenant(name="t")
        head_id = _trained_head(writer, tenant.id)
        first = cache.get(tenant_id=tenant.id, head_id=head_id)
        assert first.version == 1 and cache.misses == 1 and keys.authenticate(key) == tenant
        assert cache.get(tenant_id=tenant.id, head_id=head_id) is first and cache.hits == 1

        _retrain(writer, tenant.id, head_id, fill=2.0)
        _within(0.1, lambda: cache.get(tenant_id=tenant.id, head_id=head_id).version == 2)
        assert float(cache.get(tenant_id=tenant.id, head_id=head_id).weights[0, 0]) == 2.0

        new_key = writer.rotate_key(tenant_id=tenant.id)
        _within(0.1, lambda: keys.authenticate(key) is None)
        assert keys.authenticate(new_key) == tenant

        writer.delete_head(tenant_id=tenant.id, head_id=head_id)
        _within(0.1, lambda: cache.get(tenant_id=tenant.id, head_id=head_id) is None)
        assert len(cache) == 0 and cache.bytes == 0
    finally:
        watcher.close()
        writer.close()
        reader.close()


def test_a_read_that_straddles_a_check_is_served_but_not_kept(store) -> None:
    """A cold read that began before a check may hold the version the check replaced: it
    answers its own request, and the next one reads again."""
    tenant, _ = store.create_tenant(name="t")
    head_id = _trained_head(store, tenant.id)
    cache = HeadCache(store, max_bytes=10**6)
    read = store.serving_head

    def read_then_check(**where):
        row = read(**where)
        cache.revalidate()  # another process's write was seen meanwhile
        return row

    store.serving_head = read_then_check
    assert cache.get(tenant_id=tenant.id, head_id=head_id).version == 1
    assert len(cache) == 0
    del store.serving_head
    cache.get(tenant_id=tenant.id, head_id=head_id)
    assert len(cache) == 1


def test_caches_are_cleared_when_the_store_cannot_be_checked(store) -> None:
    tenant, key = store.create_tenant(name="t")
    head_id = _trained_head(store, tenant.id)
    cache, keys = HeadCache(store, max_bytes=10**6), KeyCache(store)
    watcher = ChangeWatcher(store, interval_s=3600, caches=[cache, keys])  # polled by hand
    try:
        cache.get(tenant_id=tenant.id, head_id=head_id)
        keys.authenticate(key)
        with store._tx() as db:
            db.exec_driver_sql("DROP TABLE changes")
        watcher.poll()
        assert len(cache) == 0 and keys.authenticate(key) == tenant  # read again, not cached
    finally:
        watcher.close()


def test_another_tenant_never_gets_the_cached_head(store) -> None:
    owner, _ = store.create_tenant(name="owner")
    other, _ = store.create_tenant(name="other")
    head_id = _trained_head(store, owner.id)
    cache = HeadCache(store, max_bytes=10**6)
    assert cache.get(tenant_id=owner.id, head_id=head_id) is not None
    assert cache.get(tenant_id=other.id, head_id=head_id) is None
    assert len(cache) == 1  # the probe did not evict the owner's head


def test_untrained_heads_are_unservable(store) -> None:
    tenant, _ = store.create_tenant(name="t")
    head = store.create_head(tenant_id=tenant.id, name="new", backbone="bb")
    assert HeadCache(store, 10**6).get(tenant_id=tenant.id, head_id=head.id) == Unservable(
        "training"
    )


def test_the_byte_budget_evicts_least_recently_used(store) -> None:
    tenant, _ = store.create_tenant(name="t")
    ids = [_trained_head(store, tenant.id, name=str(i), dim=256) for i in range(5)]
    one = HeadCache(store, 10**9).get(tenant_id=tenant.id, head_id=ids[0]).nbytes
    cache = HeadCache(store, max_bytes=3 * one)
    for head_id in ids[:3]:
        cache.get(tenant_id=tenant.id, head_id=head_id)
    cache.get(tenant_id=tenant.id, head_id=ids[0])  # ids[0] is now the most recent
    cache.get(tenant_id=tenant.id, head_id=ids[3])  # evicts ids[1]
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    misses = cache.misses
    cache.get(tenant_id=tenant.id, head_id=ids[0])
    assert cache.misses == misses  # still cached
    cache.get(tenant_id=tenant.id, head_id=ids[1])
    assert cache.misses == misses + 1  # was evicted, read again


def test_a_head_that_reads_depths_is_served_with_them(store) -> None:
    """A version reading the deepest depths keeps that number, its wider weights and its
    class means on the embedding alone, through the store and the cache."""
    tenant, _ = store.create_tenant(name="t")
    head = store.create_head(tenant_id=tenant.id, name="deep", backbone="bb")
    store.save_version(
        tenant_id=tenant.id, head_id=head.id, backbone="bb", new_embeddings={}, examples=[],
        labels=["a", "b"], weights=np.ones((64 + 24, 2), np.float32),
        bias=np.zeros(2, np.float32), prototypes=np.eye(64, 2, dtype=np.float32),
        unknown_threshold=0.5, metrics={}, depths=2,
    )  # fmt: skip
    served = HeadCache(store, max_bytes=10**6).get(tenant_id=tenant.id, head_id=head.id)
    assert served.depths == 2 and served.weights.shape == (88, 2)
    assert served.prototypes.shape == (64, 2)
    rows = np.zeros((1, 88), np.float32)
    rows[0, 1] = 1.0  # the embedding points at class "b"'s mean; the depths play no part
    _, similarity = served.apply(rows)
    assert similarity[0] == 1.0
    assert store.get_head(tenant_id=tenant.id, head_id=head.id).depths == 2
