"""Heads held in memory for serving: an LRU bounded by bytes, checked against the store.

Every lookup asks the store for the head's current version in one indexed read, and the
weights travel only when the cached copy is missing or older: a changed or deleted head
is never served stale, a hot head costs a tiny read, and a cold head one read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from adapters.heads import predict_proba
from adapters.store import Store


@dataclass(frozen=True)
class ServingHead:
    id: str
    tenant_id: str
    backbone: str
    version: int
    labels: list[str]
    weights: np.ndarray  # (embedding_dim, n_labels) float32
    bias: np.ndarray
    prototypes: np.ndarray | None  # (embedding_dim, n_labels) normalised class means
    unknown_threshold: float | None

    @property
    def nbytes(self) -> int:
        arrays = self.weights.nbytes + self.bias.nbytes
        if self.prototypes is not None:
            arrays += self.prototypes.nbytes
        return arrays + sum(len(label) + 50 for label in self.labels)

    def apply(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's label probabilities, and its best cosine similarity to a class mean
        (NaN for a head version without class means)."""
        probabilities = predict_proba(embeddings, self.weights, self.bias)
        if self.prototypes is None:
            return probabilities, np.full(len(embeddings), np.nan, dtype=np.float32)
        return probabilities, (embeddings @ self.prototypes).max(axis=1)

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
        self._lock = threading.Lock()

    def get(self, *, tenant_id: str, head_id: str) -> ServingHead | Unservable | None:
        """The head's latest trained version; None when the tenant has no such head."""
        with self._lock:
            cached = self._heads.get(head_id)
        known = cached.version if cached is not None and cached.tenant_id == tenant_id else None
        row = self._store.serving_head(tenant_id=tenant_id, head_id=head_id, known_version=known)
        if row is None:
            if known is not None:  # deleted: drop it (never on another tenant's say-so)
                self._evict(head_id)
            return None
        if row.weights is None and row.version == known:
            with self._lock:
                self.hits += 1
                if head_id in self._heads:
                    self._heads.move_to_end(head_id)
            return cached
        if row.weights is None:
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
        )
        self._put(head)
        return head

    def _put(self, head: ServingHead) -> None:
        with self._lock:
            self.misses += 1
            old = self._heads.pop(head.id, None)
            if old is not None:
                self.bytes -= old.nbytes
            if head.nbytes > self.max_bytes:
                return
            self._heads[head.id] = head
            self.bytes += head.nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._heads.popitem(last=False)
                self.bytes -= evicted.nbytes

    def _evict(self, head_id: str) -> None:
        with self._lock:
            old = self._heads.pop(head_id, None)
            if old is not None:
                self.bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._heads)
