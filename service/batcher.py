"""Adaptive batching: one backbone pass for the rows of many requests, predicts first.

Each backbone has one `Batcher` with its own thread, in the runner process. Requests from
every API worker and tenant hand it their preprocessed rows (uint8 NHWC images, or token
id arrays) and wait on a future of their embeddings.

- Predict rows go first: the thread takes up to `max_batch_size` of them, or whatever has
  arrived `max_latency_ms` after the oldest waiting row.
- Training rows (a new head's examples) run in slices sized to take about
  `training_slice_ms`: while no predict waits, and under a load with no gaps at most one
  slice in five. A predict waits behind at most one slice, whatever the size of the
  training job, and training still finishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Rows = np.ndarray | list  # uint8 NHWC images, or one int64 token-id array per text
Priority = Literal["predict", "training"]
# Under a predict load with no gaps, training takes one slice per this many slices' time
# (a fifth of the backbone at most): predicts slow by one slice at worst, training ends.
TRAINING_SHARE_EVERY = 5


@dataclass(eq=False)
class _Request:
    rows: Rows
    priority: Priority
    arrived: float
    future: Future = field(default_factory=Future)
    taken: int = 0  # rows handed to a batch so far
    done: int = 0  # rows answered so far
    embeddings: np.ndarray | None = None


class Batcher:
    def __init__(
        self,
        embed: Callable[[Rows], np.ndarray],
        *,
        name: str,
        max_batch_size: int,
        max_latency_ms: float,
        training_slice_ms: float,
    ) -> None:
        self.embed = embed
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000
        self.training_slice_s = training_slice_ms / 1000
        self.batches = 0
        self.rows = 0
        self.training_rows = 0
        self._training_seconds_per_row = 0.0  # running mean over training passes
        self._last_training = time.monotonic()  # when a training slice last started
        self._waiting: dict[Priority, deque[_Request]] = {"predict": deque(), "training": deque()}
        self._predict_rows = 0
        self._ready = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._loop, name=f"graft-batcher-{name}", daemon=True
        )
        self._thread.start()

    def submit(self, rows: Rows, priority: Priority = "predict") -> Future:
        """Future of the (len(rows), embedding_dim) embeddings of these rows."""
        request = _Request(rows=rows, priority=priority, arrived=time.monotonic())
        if len(rows) == 0:
            request.future.set_result(self.embed(rows))
            return request.future
        with self._ready:
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            self._waiting[priority].append(request)
            if priority == "predict":
                self._predict_rows += len(rows)
            self._ready.notify()
        return request.future

    def close(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join(timeout=30)

    def stats(self) -> dict:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "training_rows": self.training_rows,
            "mean_batch_size": round(self.rows / self.batches, 2) if self.batches else None,
        }

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
        """Waits for rows, then takes a batch of them as (request, start, n)."""
        predicts, training = self._waiting["predict"], self._waiting["training"]
        with self._ready:
            while not predicts and not training and not self._stopping:
                self._ready.wait()
            if self._stopping and not predicts and not training:
                return None
            # Training waits for a gap in predicts, but under a load that leaves none it
            # still gets one slice per TRAINING_SHARE_EVERY slices' time: it always ends.
            starved = (
                time.monotonic() - self._last_training
                > TRAINING_SHARE_EVERY * self.training_slice_s
            )
            if predicts and not (training and starved):
                # Wait for the batch to fill, but never longer than max_latency after the
                # oldest row arrived: rows that queued while the backbone was busy go at once.
                deadline = predicts[0].arrived + self.max_latency_s
                while self._predict_rows < self.max_batch_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._ready.wait(left)
                batch = self._take(predicts, self.max_batch_size)
                self._predict_rows -= sum(n for _, _, n in batch)
                return batch
            # The first slice is one row; from then on, as many as fit the slice.
            room = 1
            if self._training_seconds_per_row > 0:
                room = int(self.training_slice_s / self._training_seconds_per_row)
            self._last_training = time.monotonic()
            return self._take(training, max(1, min(self.max_batch_size, room)))

    @staticmethod
    def _take(queue: deque[_Request], room: int) -> list[tuple[_Request, int, int]]:
        batch = []
        while queue and room:
            request = queue[0]
            n = min(room, len(request.rows) - request.taken)
            batch.append((request, request.taken, n))
            request.taken += n
            room -= n
            if request.taken == len(request.rows):
                queue.popleft()
        return batch

    def _run(self, batch: list[tuple[_Request, int, int]]) -> None:
        parts = [request.rows[start : start + n] for request, start, n in batch]
        rows = (
            np.concatenate(parts)
            if isinstance(parts[0], np.ndarray)
            else [r for p in parts for r in p]
        )
        started = time.perf_counter()
        embeddings = self.embed(rows)
        if batch[0][0].priority == "training":
            # Measured on training passes only: per row, a pass of many rows costs less
            # than one of a few (on a GPU, ten times less), so the slices grow to fit.
            per_row = (time.perf_counter() - started) / len(rows)
            known = self._training_seconds_per_row
            self._training_seconds_per_row = 0.5 * known + 0.5 * per_row if known else per_row
        self.batches += 1
        self.rows += len(rows)
        offset = 0
        for request, start, n in batch:
            if request.embeddings is None:
                request.embeddings = np.empty((len(request.rows), embeddings.shape[1]), np.float32)
            request.embeddings[start : start + n] = embeddings[offset : offset + n]
            offset += n
            request.done += n
            if request.priority == "training":
                self.training_rows += n
            if request.done == len(request.rows):
                request.future.set_result(request.embeddings)
