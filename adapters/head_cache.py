"""Heads held in memory for serving: an LRU bounded by bytes.

A cached head costs no read; a cold one costs one. The copies are kept in step with the
store by `adapters/coherence.py`: when any process writes a new version or deletes a
head, every process's copy is checked within about one poll.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from adapters.heads import best_similarity, predict_proba
from adapters.store import Store

if TYPE_CHECKING:
    from models.runtime import Top


@dataclass(frozen=True)
class ServingHead:
    id: str
    tenant_id: str
    backbone: str
    version: int
    labels: list[str]
    weights: np.ndarray  # (columns read, n_labels) float32
    bias: np.ndarray
    prototypes: np.ndarray | None  # (leading columns, n_labels) normalised class means
    unknown_threshold: float | None
    # A fine-tuned head's top: its key in the runner's batches and its LoRA factors.
    top: Top | None = None
    # How many of the deepest depths its rows carry after the embedding (the runner cuts
    # them: service/batcher.py).
    depths: int = 0

    @property
    def nbytes(self) -> int:
        arrays = self.weights.nbytes + self.bias.nbytes
        if self.prototypes is not None:
            arrays += self.prototypes.nbytes
        if self.top is not None:
            arrays += sum(f.nbytes for f in self.top[1])
        return arrays + sum(len(label) + 50 for label in self.labels)

    def apply(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's label probabilities, and its best cosine similarity to a class mean
        (NaN for a head version without class means)."""
        probabilities = predict_proba(rows, self.weights, self.bias)
        if self.prototypes is None:
            return probabilities, np.full(len(rows), np.nan, dtype=np.float32)
        return probabilities, best_similarity(rows, self.prototypes)

    def unknown(self, similarity: np.ndarray) -> np.ndarray:
        """Which rows are further from every class mean than the head's threshold."""
        if self.unknown_threshold is None:
            return np.zeros(len(similarity), dtype=bool)
        return similarity < self.unknown_threshold


@dataclass(frozen=True)
class Unservable:
    """The head exists but has no trained version yet."""

    status: str


class HeadCache:
    def __init__(self, store: Store, max_bytes: int) -> None:
        self._store = store
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._heads: OrderedDict[str, ServingHead] = OrderedDict()
        self._epoch = 0  # moves on every check: a read that straddles one is not kept
        self._lock = threading.Lock()

    def get(self, *, tenant_id: str, head_id: str) -> ServingHead | Unservable | None:
        """The head's latest trained version; None when the tenant has no such head."""
        with self._lock:
            cached = self._heads.get(head_id)
            if cached is not None and cached.tenant_id == tenant_id:
                self.hits += 1
                self._heads.move_to_end(head_id)
                return cached
            epoch = self._epoch
        row = self._store.serving_head(tenant_id=tenant_id, head_id=head_id)
        if row is None:
            return None
        if row.weights is None or row.bias is None:  # no trained version yet
            return Unservable(row.status)
        head = ServingHead(
            id=head_id,
            tenant_id=tenant_id,
            backbone=row.backbone,
            version=row.version,
            labels=row.labels,
            weights=row.weights,
            bias=row.bias,
            prototypes=row.prototypes,
            unknown_threshold=row.unknown_threshold,
            top=None if row.top_factors is None else (f"{head_id}/{row.version}", row.top_factors),
            depths=row.depths,
        )
        self._put(head, epoch)
        return head

    def revalidate(self) -> None:
        """Drops every cached head that was deleted or has a newer version: one bulk read."""
        with self._lock:
            self._epoch += 1
            cached = {head_id: head.version for head_id, head in self._heads.items()}
        current = self._store.head_versions(cached)
        with self._lock:
            for head_id, version in cached.items():
                if current.get(head_id) != version:
                    self._evict(head_id)

    def evict(self, head_id: str) -> None:
        """This process changed the head: drop its copy now, not at the next poll."""
        with self._lock:
            self._epoch += 1
            self._evict(head_id)

    def clear(self) -> None:
        with self._lock:
            self._epoch += 1
            self._heads.clear()
            self.bytes = 0

    def _put(self, head: ServingHead, epoch: int) -> None:
        with self._lock:
            self.misses += 1
            if epoch != self._epoch or head.nbytes > self.max_bytes:
                return  # served once, not kept: it may be older than what was checked
            self._evict(head.id)
            self._heads[head.id] = head
            self.bytes += head.nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._heads.popitem(last=False)
                self.bytes -= evicted.nbytes

    def _evict(self, head_id: str) -> None:
        old = self._heads.pop(head_id, None)
        if old is not None:
            self.bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._heads)
