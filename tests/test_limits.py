"""The per-tenant token bucket, on a clock the test moves by hand, and its share of the
fleet's rate."""

from __future__ import annotations

import time

import pytest

from adapters.fleet import ALIVE_S, FleetSize, Heartbeat
from adapters.store import Store
from service.limits import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_the_sustained_rate(tmp_path) -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, path=tmp_path / "rl.sqlite3", clock=clock)
    assert [limiter.wait_needed("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_needed("a") == pytest.approx(0.5)  # one token refills in 1/rate
    assert limiter.wait_needed("b") == 0.0  # another tenant has its own bucket
    clock.now = 0.5
    assert limiter.wait_needed("a") == 0.0
    assert limiter.wait_needed("a") == pytest.approx(0.5)
    clock.now = 100.0  # a long pause refills to the burst, never beyond it
    assert [limiter.wait_needed("a") for _ in range(4)][-1] == pytest.approx(0.5)


def test_zero_rate_means_no_limit(tmp_path) -> None:
    limiter = RateLimiter(rate=0, burst=1, path=tmp_path / "rl.sqlite3")
    assert all(limiter.wait_needed("a") == 0.0 for _ in range(1000))


def test_idle_buckets_are_dropped(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(RateLimiter, "PRUNE_AT", 10)
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2, path=tmp_path / "rl.sqlite3", clock=clock)
    for i in range(10):
        limiter.wait_needed(f"idle-{i}")
    clock.now = 5.0  # every bucket has refilled
    limiter.wait_needed("busy")
    limiter.wait_needed("busy")
    limiter.wait_needed("new")  # the 12th bucket: over PRUNE_AT, the full ones go
    assert limiter.buckets() == {"busy", "new"}  # both still short of their burst


def test_every_worker_takes_from_the_same_bucket(tmp_path) -> None:
    """Two limiters on one file, as two API worker processes: one bucket per tenant."""
    clock = Clock()
    path = tmp_path / "rl.sqlite3"
    workers = [RateLimiter(rate=1.0, burst=4, path=path, clock=clock) for _ in range(2)]
    taken = [workers[i % 2].wait_needed("a") for i in range(6)]
    assert taken[:4] == [0.0] * 4 and taken[4] > 0 and taken[5] > 0


def test_each_of_n_replicas_takes_its_share_of_the_fleet_rate(tmp_path, database_url) -> None:
    """Two replicas alive (heartbeats in the store): each holds a tenant to half the rate
    and burst; one not heard from for ALIVE_S is no longer counted."""
    store = Store(database_url)
    limiter = RateLimiter(rate=4.0, burst=6, path=tmp_path / "rl.sqlite3", clock=Clock())
    beats = [Heartbeat(store, "replica-a"), Heartbeat(store, "replica-b")]
    size = FleetSize(store, limiter.share_with)
    try:
        assert size.replicas == 2 and (limiter.rate, limiter.burst) == (2.0, 3.0)
        assert [limiter.wait_needed("a") for _ in range(4)][-1] == pytest.approx(0.5)
        time.sleep(0.2)
        store.heartbeat(replica_id="replica-a")  # b stopped: only a is heard from since
        assert store.live_replicas(within_s=0.1) == 1
        assert store.live_replicas(within_s=ALIVE_S) == 2
    finally:
        size.close()
        for beat in beats:
            beat.close()
        store.close()
    limiter.share_with(1)
    assert (limiter.rate, limiter.burst) == (4.0, 6.0)
