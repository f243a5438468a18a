from __future__ import annotations

import numpy as np
import pytest

from adapters.head_cache import HeadCache, Unservable
from adapters.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "graft.sqlite3")
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


def test_hits_stay_current_with_the_store(store) -> None:
    tenant, _ = store.create_tenant(name="t")
    head_id = _trained_head(store, tenant.id)
    cache = HeadCache(store, max_bytes=10**6)
    first = cache.get(tenant_id=tenant.id, head_id=head_id)
    assert first.version == 1 and cache.misses == 1
    assert cache.get(tenant_id=tenant.id, head_id=head_id) is first and cache.hits == 1

    _retrain(store, tenant.id, head_id, fill=2.0)  # a new version is never served stale
    second = cache.get(tenant_id=tenant.id, head_id=head_id)
    assert second.version == 2 and float(second.weights[0, 0]) == 2.0

    store.delete_head(tenant_id=tenant.id, head_id=head_id)  # nor is a deleted head
    assert cache.get(tenant_id=tenant.id, head_id=head_id) is None
    assert len(cache) == 0 and cache.bytes == 0


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
