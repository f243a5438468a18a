"""What each process keeps of the store, kept in step with every other process's writes.

A request reads no database row when its tenant's key and its head are cached. Every
process polls the store's change count (one tiny read every `GRAFT_CACHE_POLL_S`); when
it moves, the keys are dropped and the cached heads' versions are checked in one bulk
read, so that a new version, a deleted head, a deleted tenant or a new key written by any
process of any replica is seen everywhere within about one poll. The process that wrote
drops its own copy at once, and answers two polls later (`Graft.published`), so a client
that has its answer finds the change on every replica.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from adapters.store import Store, Tenant

log = logging.getLogger(__name__)

# Keys remembered per process: a few MB, far more tenants than one process serves at once.
MAX_KEYS = 100_000


class Cache(Protocol):
    def revalidate(self) -> None:
        """Drops whatever the store no longer holds as cached."""

    def clear(self) -> None: ...


class KeyCache:
    """Tenants by API key: no read and no salted hash per request. Only valid keys are
    kept, under their SHA-256 (the key itself is not kept)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._tenants: dict[bytes, Tenant] = {}
        self._epoch = 0  # moves on every clear: a read that straddles one is not kept
        self._lock = threading.Lock()

    def authenticate(self, api_key: str) -> Tenant | None:
        digest = hashlib.sha256(api_key.encode()).digest()
        with self._lock:
            tenant = self._tenants.get(digest)
            epoch = self._epoch
        if tenant is not None:
            return tenant
        tenant = self._store.authenticate(api_key=api_key)
        if tenant is not None:
            with self._lock:
                if epoch == self._epoch and len(self._tenants) < MAX_KEYS:
                    self._tenants[digest] = tenant
        return tenant

    def revalidate(self) -> None:
        self.clear()  # a key changes rarely: reading it again is cheaper than checking

    def clear(self) -> None:
        with self._lock:
            self._epoch += 1
            self._tenants.clear()


class Every:
    """Runs `step` now and then every `interval_s` on a thread of its own, until closed."""

    def __init__(self, step: Callable[[], None], interval_s: float, name: str) -> None:
        self._step = step
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._run_step()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._run_step()

    def _run_step(self) -> None:
        try:
            self._step()
        except Exception:
            log.warning(
                "%s failed; tried again in %g s", self._step, self._interval_s, exc_info=True
            )

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class ChangeWatcher(Every):
    """Polls the store's change count on a thread and tells the caches when it moves.
    When the store cannot be read, the caches are cleared: nothing is served from a copy
    that cannot be checked."""

    def __init__(self, store: Store, interval_s: float, caches: Sequence[Cache]) -> None:
        self._store = store
        self._caches = caches
        self._last: int | None = store.change_count()
        super().__init__(self.poll, interval_s, "graft-change-watcher")

    def poll(self) -> None:
        try:
            count = self._store.change_count()
            if count != self._last:
                for cache in self._caches:
                    cache.revalidate()
        except Exception:
            if self._last is not None:
                log.warning("cannot read the store's change count: caches cleared", exc_info=True)
            for cache in self._caches:
                cache.clear()
            count = None
        self._last = count
