"""Cross-tenant adaptive batching: one backbone pass for the rows of many requests.

Each backbone has one `Batcher` with its own thread. Predict requests (any tenant, any
head) hand it their decoded rows and wait on a future. The thread takes up to
`max_batch_size` rows, or whatever has arrived `max_latency_ms` after the oldest waiting
row, runs the backbone once, applies each row's head with one matrix product per head in
the batch, and hands every request exactly its own rows back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from adapters.head_cache import ServingHead
from adapters.heads import predict_proba
from models.runtime import Backbone

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    head: ServingHead
    rows: np.ndarray | list[str]  # uint8 NHWC images, or texts
    arrived: float
    future: Future = field(default_factory=Future)
    taken: int = 0  # rows handed to a batch so far
    done: int = 0  # rows answered so far
    probabilities: np.ndarray | None = None
    similarity: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.probabilities = np.empty((len(self.rows), len(self.head.labels)), dtype=np.float32)
        self.similarity = np.full(len(self.rows), np.nan, dtype=np.float32)


class Batcher:
    def __init__(self, backbone: Backbone, *, max_batch_size: int, max_latency_ms: float) -> None:
        self.backbone = backbone
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000
        self.batches = 0
        self.rows = 0
        self._waiting: deque[_Request] = deque()
        self._waiting_rows = 0
        self._ready = threading.Condition()
        self._stopping = False
        self._images: np.ndarray | None = None
        if backbone.spec.modality == "image":
            side = backbone.spec.preprocessing.image_size
            # One input buffer for the life of the batcher, reused by every batch.
            self._images = np.empty((max_batch_size, side, side, 3), dtype=np.uint8)
        self._thread = threading.Thread(
            target=self._loop, name=f"graft-batcher-{backbone.spec.id}", daemon=True
        )
        self._thread.start()

    def submit(self, head: ServingHead, rows: np.ndarray | list[str]) -> Future:
        """Future of (probabilities, similarity) of these rows under this head: the
        (rows, labels) scores and each row's best cosine similarity to a class mean (NaN
        for a head version without class means)."""
        request = _Request(head=head, rows=rows, arrived=time.monotonic())
        with self._ready:
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            self._waiting.append(request)
            self._waiting_rows += len(rows)
            self._ready.notify()
        return request.future

    def close(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as exc:  # a failing batch fails its requests, not the thread
                log.exception("batch of %d rows failed", sum(n for _, _, n in batch))
                for request, _, _ in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)

    def _next_batch(self) -> list[tuple[_Request, int, int]] | None:
        """Waits for rows, then takes up to max_batch_size of them as (request, start, n)."""
        with self._ready:
            while not self._waiting and not self._stopping:
                self._ready.wait()
            if self._stopping and not self._waiting:
                return None
            # Wait for the batch to fill, but never longer than max_latency after the
            # oldest row arrived: rows that queued while the backbone was busy go at once.
            deadline = self._waiting[0].arrived + self.max_latency_s
            while self._waiting_rows < self.max_batch_size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            batch = []
            room = self.max_batch_size
            while self._waiting and room:
                request = self._waiting[0]
                n = min(room, len(request.rows) - request.taken)
                batch.append((request, request.taken, n))
                request.taken += n
                room -= n
                self._waiting_rows -= n
                if request.taken == len(request.rows):
                    self._waiting.popleft()
            return batch

    def _run(self, batch: list[tuple[_Request, int, int]]) -> None:
        n = sum(count for _, _, count in batch)
        if self._images is not None:
            offset = 0
            for request, start, count in batch:
                self._images[offset : offset + count] = request.rows[start : start + count]
                offset += count
            embeddings = self.backbone.embed_images(self._images[:n])
        else:
            texts = [
                t for request, start, count in batch for t in request.rows[start : start + count]
            ]
            embeddings = self.backbone.embed_texts(texts)
        self.batches += 1
        self.rows += n

        # Rows of the same head (often of several requests) go through it in one product.
        by_head: dict[tuple[str, int], list[tuple[_Request, int, int, int]]] = {}
        offset = 0
        for request, start, count in batch:
            key = (request.head.id, request.head.version)
            by_head.setdefault(key, []).append((request, start, count, offset))
            offset += count
        for parts in by_head.values():
            head = parts[0][0].head
            rows = np.concatenate([np.arange(o, o + c) for _, _, c, o in parts])
            x = embeddings[rows]
            probabilities = predict_proba(x, head.weights, head.bias)
            similarity = None if head.prototypes is None else (x @ head.prototypes).max(axis=1)
            at = 0
            for request, start, count, _ in parts:
                request.probabilities[start : start + count] = probabilities[at : at + count]
                if similarity is not None:
                    request.similarity[start : start + count] = similarity[at : at + count]
                at += count
                request.done += count
                if request.done == len(request.rows):
                    request.future.set_result((request.probabilities, request.similarity))
