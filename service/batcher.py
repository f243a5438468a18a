"""Adaptive batching: one backbone pass for the rows of many requests, predicts first.

Each backbone has one `Batcher`, in the runner process. Requests from every API worker and
tenant hand it their preprocessed rows (uint8 NHWC images, or token id arrays) and wait
on a future of their embeddings.

- Predict rows: a lane (a thread) takes up to `max_batch_size` of them, or whatever has
  arrived `max_latency_ms` after the oldest waiting row. With several lanes (the CPU: one
  per core, each pass on one thread), passes run side by side: a one-thread pass costs
  less CPU per row than one split over threads that must wake each other.
- Training rows (a new head's examples) run in slices sized to take about
  `training_slice_ms`, in one of two ways:
  - with `training_lane` (the CPU): on a thread of their own at SCHED_IDLE
    (`service/priority.py`), through a session of their own that this thread makes (any
    thread it starts inherits the policy). Predicts never wait behind them, and the
    kernel gives the cores to predicts (their backbone pass, and the API workers'
    decoding) first.
  - without (a GPU, which the kernel does not schedule): on the predict thread, while no
    predict waits, and under a load with no gaps at most one slice in five. A predict
    waits behind one slice at most, and training still ends.
- Depths: a request may ask for the deepest `depths` of the backbone's pooled depths
  after each row's embedding (models/depths.py): a head that reads them, or a training.
  A batch in which any request asks runs the pass with its depths; each request gets
  its own columns, so only those cross to the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from adapters.depth_choice import RowLayout
from service.priority import run_in_idle_time

if TYPE_CHECKING:
    from models.runtime import Top

log = logging.getLogger(__name__)

Rows = np.ndarray | list  # uint8 NHWC images, or one int64 token-id array per text
Priority = Literal["predict", "training"]
# Rows to embeddings; a fine-tunable backbone's also takes the groups of rows that go
# through fine-tuned heads' tops (models.runtime.TopGroup).
Embed = Callable[..., np.ndarray]
# Sharing the predict thread, under a predict load with no gaps, training takes one slice
# per this many slices' time (a fifth of the backbone at most).
TRAINING_SHARE_EVERY = 5


@dataclass(eq=False)
class _Request:
    rows: Rows
    priority: Priority
    arrived: float
    top: Top | None = None
    depths: int = 0  # how many of the deepest depths follow each row's embedding
    future: Future = field(default_factory=Future)
    taken: int = 0  # rows handed to a batch so far
    done: int = 0  # rows answered so far
    embeddings: np.ndarray | None = None


Batch = list[tuple[_Request, int, int]]  # (request, first row, rows)


class Batcher:
    def __init__(
        self,
        embed: Embed,
        *,
        name: str,
        max_batch_size: int,
        max_latency_ms: float,
        training_slice_ms: float,
        training_lane: Callable[[], Embed] | None = None,
        predict_lanes: int = 1,
        check_top: Callable[[Top], None] | None = None,
        layout: RowLayout | None = None,
    ) -> None:
        self.embed = embed
        # Where the depths lie in the rows `embed(rows, depths=True)` gives; None: `embed`
        # gives no depths (and takes no `depths`).
        self.layout = layout if layout is not None and layout.depth_widths else None
        # Given when `embed` takes `tops` (rows of fine-tuned heads, models/runtime.py):
        # checks a request's top before its rows join a batch.
        self.check_top = check_top
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000
        self.training_slice_s = training_slice_ms / 1000
        self.batches = 0
        self.rows = 0
        self.training_rows = 0
        self.pass_cpu_s = 0.0
        self._training_seconds_per_row = 0.0  # running mean over training passes
        self._last_training = time.monotonic()  # when a training slice last started
        self._waiting: dict[Priority, deque[_Request]] = {"predict": deque(), "training": deque()}
        self._predict_rows = 0
        self._ready = threading.Condition()
        self._stopping = False
        self._training_lane = training_lane is not None
        self._threads = [
            threading.Thread(target=self._loop, name=f"graft-batcher-{name}-{i}", daemon=True)
            for i in range(predict_lanes)
        ]
        if training_lane is not None:
            self._threads.append(
                threading.Thread(
                    target=self._training_loop,
                    args=(training_lane,),
                    name=f"graft-training-{name}",
                    daemon=True,
                )
            )
        for thread in self._threads:
            thread.start()

    def submit(
        self,
        rows: Rows,
        priority: Priority = "predict",
        top: Top | None = None,
        depths: int = 0,
    ) -> Future:
        """Future of the embeddings of these rows (through a fine-tuned head's top, with
        `top`), each followed by the deepest `depths` depths (all the backbone has, if it
        has fewer)."""
        if top is not None:
            if self.check_top is None:
                raise ValueError("this backbone serves no fine-tuned heads")
            self.check_top(top)
        if depths < 0:
            raise ValueError(f"depths must be 0 or more, not {depths}")
        depths = min(depths, len(self.layout.depth_widths)) if self.layout else 0
        request = _Request(
            rows=rows, priority=priority, arrived=time.monotonic(), top=top, depths=depths
        )
        if len(rows) == 0:
            embeddings = (
                self._cut(self.embed(rows, depths=True), depths) if depths else self.embed(rows)
            )
            request.future.set_result(embeddings)
            return request.future
        with self._ready:
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            self._waiting[priority].append(request)
            if priority == "predict":
                self._predict_rows += len(rows)
            self._ready.notify_all()  # the predict lanes, or the training lane
        return request.future

    def close(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def stats(self) -> dict:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "training_rows": self.training_rows,
            # CPU of the threads that called the backbone (all of it with one-thread
            # passes; without the session's own pool threads otherwise).
            "pass_cpu_s": round(self.pass_cpu_s, 3),
            "mean_batch_size": round(self.rows / self.batches, 2) if self.batches else None,
        }

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch, self.embed)

    def _training_loop(self, make_embed: Callable[[], Embed]) -> None:
        run_in_idle_time()
        embed = None  # made on the first training rows: a backbone never trained on costs none
        training = self._waiting["training"]
        while True:
            with self._ready:
                while not training and not self._stopping:
                    self._ready.wait()
                if not training:
                    return
                batch = self._training_slice()
            try:
                embed = embed or make_embed()  # threads it starts inherit the nice
            except Exception as exc:  # no session: these rows fail, the next ones try again
                self._fail(batch, exc)
                continue
            self._run(batch, embed)

    def _next_batch(self) -> Batch | None:
        """Waits for rows, then takes a batch of them."""
        with self._ready:
            while not (batch := self._take_batch()):
                if self._stopping:
                    return None
            return batch

    def _take_batch(self) -> Batch:
        """Called with the lock held: waits for rows and takes a batch of them, or nothing
        when stopping or when another lane took the rows first."""
        predicts = self._waiting["predict"]
        # With a lane of its own, training is none of this thread's business.
        training = self._waiting["training"] if not self._training_lane else deque()
        while not predicts and not training and not self._stopping:
            self._ready.wait()
        if not predicts and not training:
            return []
        # Training waits for a gap in predicts, but under a load that leaves none it
        # still gets one slice per TRAINING_SHARE_EVERY slices' time: it always ends.
        since = time.monotonic() - self._last_training
        starved = since > TRAINING_SHARE_EVERY * self.training_slice_s
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
        return self._training_slice()

    def _training_slice(self) -> Batch:
        """Called with the lock held. The first slice is one row; it measures the backbone,
        and from then on a slice holds as many rows as fit `training_slice_ms`."""
        room = 1
        if self._training_seconds_per_row > 0:
            room = int(self.training_slice_s / self._training_seconds_per_row)
        self._last_training = time.monotonic()
        return self._take(self._waiting["training"], max(1, min(self.max_batch_size, room)))

    @staticmethod
    def _take(queue: deque[_Request], room: int) -> Batch:
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

    def _cut(self, rows: np.ndarray, depths: int) -> np.ndarray:
        """Rows of a pass with its depths, cut to the embedding and the deepest `depths`."""
        assert self.layout is not None  # no request asks for depths otherwise
        return rows[:, self.layout.columns(depths)]

    @staticmethod
    def _fail(batch: Batch, exc: Exception) -> None:
        log.error("batch of %d rows failed", sum(n for _, _, n in batch), exc_info=exc)
        for request, _, _ in batch:
            if not request.future.done():
                request.future.set_exception(exc)

    def _run(self, batch: Batch, embed: Embed) -> None:
        """One backbone pass; a failing pass fails its requests, not the thread."""
        parts = [request.rows[start : start + n] for request, start, n in batch]
        rows = (
            np.concatenate(parts)
            if isinstance(parts[0], np.ndarray)
            else [r for p in parts for r in p]
        )
        # The rows of each fine-tuned head, by key: one pass through its top for all.
        tops: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        offset = 0
        for request, _, n in batch:
            if request.top is not None:
                key, factors = request.top
                tops.setdefault(key, (factors, []))[1].append(np.arange(offset, offset + n))
            offset += n
        training = batch[0][0].priority == "training"
        # Depths only for a batch that someone asked them of: the pass computes them
        # anyway, but copying them out costs (BENCHMARKS.md, "Every depth in the pass").
        with_depths = any(request.depths for request, _, _ in batch)
        started = time.perf_counter()
        started_cpu = time.thread_time()
        try:
            args: tuple = (rows,)
            if tops:
                args += ([(np.concatenate(at), factors) for factors, at in tops.values()],)
            embeddings = embed(*args, depths=True) if with_depths else embed(*args)
        except Exception as exc:
            self._fail(batch, exc)
            return
        with self._ready:
            if training:
                # Measured on training passes only: per row, a pass of many rows costs
                # less than one of a few (on a GPU, ten times less), so slices grow to fit.
                per_row = (time.perf_counter() - started) / len(rows)
                known = self._training_seconds_per_row
                self._training_seconds_per_row = 0.5 * (known + per_row) if known else per_row
                self.training_rows += len(rows)
            self.batches += 1
            self.rows += len(rows)
            self.pass_cpu_s += time.thread_time() - started_cpu
            # Under the lock: another lane may be answering other rows of these requests.
            finished = []
            offset = 0
            for request, start, n in batch:
                own = embeddings[offset : offset + n]
                offset += n
                if request.future.done():  # an earlier pass of its rows failed
                    continue
                if with_depths:
                    own = self._cut(own, request.depths)
                if request.embeddings is None:
                    request.embeddings = np.empty((len(request.rows), own.shape[1]), np.float32)
                request.embeddings[start : start + n] = own
                request.done += n
                if request.done == len(request.rows):
                    finished.append(request)
        for request in finished:
            request.future.set_result(request.embeddings)
