"""Batching across requests: many requests share backbone passes, none sees another's rows,
and training rows never hold a predict up for longer than one short slice."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from adapters.depth_choice import RowLayout
from models.preprocess import decode_image, token_ids
from service.batcher import Batcher
from tests.inputs import COOKING, SPORTS, crops


def _rows(backbone):
    """Real rows of the backbone's kind, and their embeddings computed one pass alone."""
    if backbone.spec.modality == "image":
        pool = crops("china.jpg", 6, seed=0) + crops("flower.jpg", 6, seed=0)
        rows = np.stack([decode_image(x, backbone.spec.preprocessing, 10**8) for x in pool])
    else:
        rows = token_ids(SPORTS + COOKING, backbone.tokenizer)
    return rows, backbone.embed_rows(rows)


def _pick(rows, picks):
    return rows[picks] if isinstance(rows, np.ndarray) else [rows[p] for p in picks]


@pytest.mark.parametrize("lanes", [1, 3])
@pytest.mark.parametrize("backbone_name", ["text_backbone", "image_backbone"])
def test_concurrent_requests_get_exactly_their_own_rows(request, backbone_name, lanes) -> None:
    backbone = request.getfixturevalue(backbone_name)
    all_rows, reference = _rows(backbone)
    batcher = Batcher(
        backbone.embed_rows,
        name="t",
        max_batch_size=8,
        max_latency_ms=20,
        training_slice_ms=20,
        predict_lanes=lanes,  # with several, one request's rows may be answered by two lanes
    )
    rng = np.random.default_rng(1)
    # 40 requests of 1-5 rows each, a quarter of them training; 8 rows per pass at most,
    # so requests are also split across passes.
    jobs = []
    for i in range(40):
        picks = rng.choice(len(all_rows), size=int(rng.integers(1, 6)), replace=False)
        jobs.append((_pick(all_rows, picks), picks, "training" if i % 4 == 0 else "predict"))
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda job: batcher.submit(job[0], job[2]).result(60), jobs))
    finally:
        batcher.close()
    for (_, picks, _), embeddings in zip(jobs, results, strict=True):
        # Text rows are padded with other requests' rows: the mask keeps them apart.
        np.testing.assert_allclose(embeddings, reference[picks], atol=1e-4)
    total_rows = sum(len(p) for _, p, _ in jobs)
    assert batcher.rows == total_rows
    assert batcher.training_rows == sum(len(p) for _, p, kind in jobs if kind == "training")
    assert batcher.batches < len(jobs), "no two requests ever shared a backbone pass"
    assert batcher.batches >= total_rows / 8


def test_training_runs_in_slices_between_predicts() -> None:
    """A training job of 400 rows goes through in slices of about `training_slice_ms`;
    predicts sent while it runs each wait for at most one slice."""
    passes: list[tuple[str, int]] = []

    def embed(rows: np.ndarray) -> np.ndarray:
        time.sleep(0.002 * len(rows))  # 2 ms a row, like a small CPU backbone
        passes.append(("predict" if rows[0, 0] == 1 else "training", len(rows)))
        return np.repeat(rows[:, :1].astype(np.float32), 4, axis=1)

    batcher = Batcher(embed, name="t", max_batch_size=64, max_latency_ms=0, training_slice_ms=20)
    try:
        training = batcher.submit(np.zeros((400, 1), np.uint8), "training")
        waits = []
        for _ in range(10):
            time.sleep(0.03)
            start = time.perf_counter()
            got = batcher.submit(np.ones((1, 1), np.uint8)).result(10)
            waits.append(time.perf_counter() - start)
            assert got.shape == (1, 4) and got[0, 0] == 1
        assert training.result(30).shape == (400, 4) and not training.result().any()
    finally:
        batcher.close()
    # The first slice is one row; it measures the backbone, and slices then hold ~10 rows.
    slices = [n for kind, n in passes if kind == "training"]
    assert slices[0] == 1
    assert max(slices) <= 15, slices
    assert sum(n for kind, n in passes if kind == "training") == 400
    # Never behind a whole 64-row training batch (128 ms): one slice and one predict pass.
    assert sorted(waits)[-2] < 0.1, waits


def test_training_ends_under_a_predict_load_with_no_gaps() -> None:
    def embed(rows: np.ndarray) -> np.ndarray:
        time.sleep(0.002 * len(rows))
        return rows[:, :1].astype(np.float32)

    batcher = Batcher(embed, name="t", max_batch_size=8, max_latency_ms=0, training_slice_ms=10)
    stop = threading.Event()

    def predict_back_to_back() -> None:
        while not stop.is_set():
            batcher.submit(np.ones((2, 1), np.uint8)).result(10)

    clients = [threading.Thread(target=predict_back_to_back) for _ in range(8)]
    try:
        for client in clients:
            client.start()
        time.sleep(0.1)
        # 100 rows at 2 ms: 0.2 s of backbone; a fifth of it takes about 1 s.
        assert batcher.submit(np.zeros((100, 1), np.uint8), "training").result(10).shape == (
            100,
            1,
        )
    finally:
        stop.set()
        for client in clients:
            client.join()
        batcher.close()


def test_a_training_lane_never_holds_a_predict_up() -> None:
    """With a session of its own (the CPU), training runs beside predicts, not between."""

    def embed(rows: np.ndarray) -> np.ndarray:
        return np.ones((len(rows), 2), np.float32)

    lane_threads = set()
    lane_policies = set()
    in_pass, pass_may_end = threading.Event(), threading.Event()

    def embed_training(rows: np.ndarray) -> np.ndarray:
        lane_threads.add(threading.get_native_id())
        lane_policies.add(os.sched_getscheduler(0))  # 0: the calling thread
        in_pass.set()
        pass_may_end.wait(10)  # a slow training pass: it lasts until the predict is answered
        return np.zeros((len(rows), 2), np.float32)

    batcher = Batcher(
        embed, name="t", max_batch_size=8, max_latency_ms=0, training_slice_ms=20,
        training_lane=lambda: embed_training,
    )  # fmt: skip
    try:
        training = batcher.submit(np.zeros((3, 1), np.uint8), "training")
        assert in_pass.wait(10)  # the lane is inside its first pass
        # Answered while the training pass still runs: it did not wait behind it.
        assert batcher.submit(np.ones((1, 1), np.uint8)).result(10)[0, 0] == 1
        assert not training.done()
        pass_may_end.set()
        assert not training.result(10).any() and batcher.training_rows == 3
    finally:
        batcher.close()
    assert threading.get_native_id() not in lane_threads
    assert lane_policies == {os.SCHED_IDLE}  # the kernel runs it in the time predicts leave
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the caller's thread is untouched


def test_a_training_lane_without_a_session_fails_its_rows_and_tries_again() -> None:
    tries = []

    def no_session():
        tries.append(1)
        raise RuntimeError("no memory for a second session")

    batcher = Batcher(
        lambda rows: np.ones((len(rows), 2), np.float32), name="t", max_batch_size=8,
        max_latency_ms=0, training_slice_ms=20, training_lane=no_session,
    )  # fmt: skip
    try:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="second session"):
                batcher.submit(np.zeros((2, 1), np.uint8), "training").result(5)
        assert len(tries) >= 2  # made on demand, and tried again for later rows
        assert batcher.submit(np.zeros((1, 1), np.uint8)).result(5).shape == (1, 2)
    finally:
        batcher.close()


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    def embed(rows: np.ndarray) -> np.ndarray:
        if (rows == 7).any():
            raise ValueError("a row the backbone cannot take")
        return rows.astype(np.float32)

    batcher = Batcher(embed, name="t", max_batch_size=4, max_latency_ms=0, training_slice_ms=20)
    try:
        with pytest.raises(ValueError):
            batcher.submit(np.full((1, 3), 7, np.uint8)).result(30)
        np.testing.assert_array_equal(batcher.submit(np.ones((2, 3), np.uint8)).result(30), 1)
    finally:
        batcher.close()


def test_an_empty_request_is_answered_without_a_batch() -> None:
    batcher = Batcher(
        lambda rows: np.zeros((len(rows), 4), np.float32),
        name="t", max_batch_size=4, max_latency_ms=0, training_slice_ms=20,
    )  # fmt: skip
    try:
        assert batcher.submit(np.zeros((0, 3), np.uint8)).result(5).shape == (0, 4)
        assert batcher.batches == 0
    finally:
        batcher.close()


def test_lanes_run_passes_side_by_side_and_count_their_cpu() -> None:
    running, most = 0, 0
    lock = threading.Lock()

    def embed(rows):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        busy_until = time.thread_time() + 0.05  # CPU, not sleep: pass_cpu_s must see it
        while time.thread_time() < busy_until:
            pass
        with lock:
            running -= 1
        return np.zeros((len(rows), 4), np.float32)

    batcher = Batcher(
        embed, name="t", max_batch_size=2, max_latency_ms=0, training_slice_ms=20,
        predict_lanes=2,
    )  # fmt: skip
    try:
        futures = [batcher.submit(np.zeros((2, 1))) for _ in range(4)]
        for future in futures:
            assert future.result(30).shape == (2, 4)
    finally:
        batcher.close()
    assert most == 2
    assert batcher.batches == 4 and batcher.stats()["pass_cpu_s"] >= 4 * 0.05


def test_rows_after_a_failed_request_in_a_pass_still_get_their_own_embeddings() -> None:
    # A's first two rows fail in pass 1; pass 2 holds A's last row, then B's. B must get
    # its own row's embedding, not A's: the offset moves past the rows of a failed request.
    a_taken, b_queued = threading.Event(), threading.Event()
    calls = 0

    def embed(rows):
        nonlocal calls
        calls += 1
        if calls == 1:
            a_taken.set()
            b_queued.wait(10)
            raise RuntimeError("pass 1 fails")
        return rows.astype(np.float32)

    batcher = Batcher(embed, name="t", max_batch_size=2, max_latency_ms=0, training_slice_ms=20)
    try:
        a = batcher.submit(np.full((3, 4), 1.0))
        assert a_taken.wait(10)  # the lane has taken A's first two rows
        b = batcher.submit(np.full((1, 4), 2.0))
        b_queued.set()
        with pytest.raises(RuntimeError):
            a.result(10)
        np.testing.assert_array_equal(b.result(10), np.full((1, 4), 2.0))
    finally:
        batcher.close()


@pytest.mark.parametrize("backbone_name", ["text_backbone", "image_backbone"])
def test_each_request_gets_the_depths_it_asked_for_from_one_pass(request, backbone_name) -> None:
    backbone = request.getfixturevalue(backbone_name)
    rows, _ = _rows(backbone)
    full = backbone.embed_rows(rows, depths=True)  # the embedding, then every depth
    widths = backbone.depth_widths
    dim = backbone.spec.embedding_dim
    assert len(widths) >= 2 and full.shape[1] == dim + sum(widths)
    passes: list[bool] = []

    def embed(rows, depths=False):
        passes.append(depths)
        return backbone.embed_rows(rows, depths=depths)

    batcher = Batcher(
        embed, name="t", max_batch_size=64, max_latency_ms=500, training_slice_ms=20,
        layout=RowLayout(dim, tuple(widths)),
    )  # fmt: skip
    try:
        asked = [0, 1, 2, len(widths) + 3]  # more than it has: all of them
        futures = [batcher.submit(_pick(rows, [i, i + 1]), depths=k) for i, k in enumerate(asked)]
        got = [future.result(60) for future in futures]
        alone = batcher.submit(_pick(rows, [0])).result(60)
        with pytest.raises(ValueError):
            batcher.submit(_pick(rows, [0]), depths=-1)
    finally:
        batcher.close()
    assert passes == [True, False]  # one pass for the four requests; none asked after
    for i, (k, embeddings) in enumerate(zip(asked, got, strict=True)):
        k = min(k, len(widths))
        tail = sum(widths[len(widths) - k :]) if k else 0
        expected = np.hstack([full[i : i + 2, :dim], full[i : i + 2, full.shape[1] - tail :]])
        np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    np.testing.assert_allclose(alone, full[:1, :dim], atol=1e-5)
