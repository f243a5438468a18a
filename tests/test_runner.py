"""The link between API workers and the backbone runner, over a real Unix socket, and
over TCP with a key (a runner in pods of its own)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from adapters.store import Store
from models.preprocess import decode_image, token_ids
from service.batcher import Batcher
from service.runner_client import RunnerClient, RunnerUnavailable
from service.runner_server import RunnerServer, serve_forever
from service.settings import Settings
from service.training import Trainer
from service.training_set import TRAINING_MESSAGES_IN_FLIGHT
from tests.inputs import COOKING, SPORTS, crops
from tests.server import free_port


def double(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(len(rows), -1).astype(np.float32) * 2


def _server(path, backbones) -> RunnerServer:
    batchers = {
        b.spec.id: Batcher(
            b.embed_rows, name=b.spec.id, max_batch_size=8, max_latency_ms=5, training_slice_ms=20
        )
        for b in backbones
    }
    return RunnerServer(path, batchers)


def test_workers_get_their_own_embeddings_from_one_runner(
    tmp_path, image_backbone, text_backbone
) -> None:
    """Three clients (as three API workers) and their threads share one runner."""
    pre = image_backbone.spec.preprocessing
    images = np.stack([decode_image(x, pre, 10**8) for x in crops("china.jpg", 6, seed=3)])
    texts = token_ids(SPORTS + COOKING, text_backbone.tokenizer)
    expected = {
        "efficientnet_lite0": image_backbone.embed_rows(images),
        "minilm_l6": text_backbone.embed_rows(texts),
    }
    server = _server(tmp_path / "runner.sock", [image_backbone, text_backbone])
    clients = [RunnerClient(server.address) for _ in range(3)]
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(30):
        backbone = "efficientnet_lite0" if i % 2 else "minilm_l6"
        n = len(images) if i % 2 else len(texts)
        picks = rng.choice(n, size=int(rng.integers(1, 4)), replace=False)
        rows = images[picks] if i % 2 else [texts[p] for p in picks]
        jobs.append(
            (clients[i % 3], backbone, rows, picks, "training" if i % 5 == 0 else "predict")
        )
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda j: j[0].embed(j[1], j[2], j[4]).result(60), jobs))
        for (_, backbone, _, picks, _), got in zip(jobs, results, strict=True):
            np.testing.assert_allclose(got, expected[backbone][picks], atol=1e-4)
        with pytest.raises(RuntimeError, match="no backbone 'nope'"):
            clients[0].embed("nope", images[:1]).result(10)
    finally:
        for client in clients:
            client.close()
        server.close()


def test_a_runner_that_dies_fails_what_it_held_and_a_new_one_is_found(tmp_path) -> None:
    path = tmp_path / "runner.sock"
    spawn = multiprocessing.get_context("spawn")

    def start():
        process = spawn.Process(target=serve_forever, args=(path, {"double": double}), daemon=True)
        process.start()
        return process

    runner = start()
    client = RunnerClient(path, connect_timeout_s=1)
    try:
        _wait_until_connected(client)
        rows = np.arange(12, dtype=np.uint8).reshape(2, 6)
        np.testing.assert_array_equal(client.embed("double", rows).result(30), double(rows))
        assert client.depth_widths("double") == ()  # its embed gives no depths
        runner.kill()
        runner.join()
        deadline = time.monotonic() + 120
        while client.is_connected():  # until the client's reader sees the connection close
            assert time.monotonic() < deadline, "the client never saw the runner go"
            time.sleep(0.05)
        with pytest.raises(RunnerUnavailable):
            client.embed("double", rows).result(30)
        runner = start()  # as BentoML restarts a runner that died
        _wait_until_connected(client)
        np.testing.assert_array_equal(client.embed("double", rows).result(30), double(rows))
    finally:
        client.close()
        runner.kill()


def _wait_until_connected(client: RunnerClient) -> None:
    deadline = time.monotonic() + 120
    while not client.is_connected():
        assert time.monotonic() < deadline, "the runner never came up"
        time.sleep(0.2)


def test_over_tcp_only_a_holder_of_the_key_is_served() -> None:
    """A silent client and a wrong key get nothing, and hold up no one with the key."""
    port = free_port()
    key = b"k" * 32
    batcher = Batcher(
        double, name="double", max_batch_size=8, max_latency_ms=5, training_slice_ms=20
    )
    server = RunnerServer(("127.0.0.1", port), {"double": batcher}, authkey=key)
    silent = socket.create_connection(("127.0.0.1", port))  # never answers the challenge
    rows = np.arange(12, dtype=np.uint8).reshape(3, 4)
    client = RunnerClient(("127.0.0.1", port), authkey=key)
    try:
        np.testing.assert_array_equal(client.embed("double", rows).result(10), double(rows))
        intruder = RunnerClient(("127.0.0.1", port), authkey=b"x" * 32, connect_timeout_s=1)
        with pytest.raises(RunnerUnavailable, match="refused the key"):
            intruder.embed("double", rows)
        with pytest.raises(ValueError, match="needs a key"):
            RunnerServer(("127.0.0.1", free_port()), {})
    finally:
        silent.close()
        client.close()
        server.close(drain_timeout_s=1)


def test_no_runner_is_a_clear_error(tmp_path) -> None:
    client = RunnerClient(tmp_path / "absent.sock", connect_timeout_s=0.3)
    with pytest.raises(RunnerUnavailable, match="not answering"):
        client.embed("x", np.zeros((1, 1), np.uint8))
    assert not client.is_connected()


class CountingClient(RunnerClient):
    """A worker's link that records how many of its requests were in the runner at once."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.in_flight = 0
        self.most_in_flight = 0
        self._count_lock = threading.Lock()  # answers are counted on the reader's thread

    def embed(self, backbone_id, rows, priority="predict", top=None, depths=0):
        with self._count_lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        future = super().embed(backbone_id, rows, priority, top, depths)
        future.add_done_callback(self._answered)
        return future

    def _answered(self, _) -> None:
        with self._count_lock:
            self.in_flight -= 1


def test_training_rows_cross_the_link_a_few_messages_at_a_time(tmp_path, image_backbone) -> None:
    """A large training set queued on the link at once would hold the worker's predicts
    behind it; its rows come back whole and in order all the same."""
    rows = np.arange(100 * 3, dtype=np.uint8).reshape(100, 3)
    batcher = Batcher(
        double, name="double", max_batch_size=8, max_latency_ms=0, training_slice_ms=5
    )
    server = RunnerServer(tmp_path / "runner.sock", {"double": batcher})
    client = CountingClient(server.address)
    trainer = Trainer(Store(tmp_path / "graft.sqlite3"), client, Settings(data_dir=tmp_path))
    spec = dataclasses.replace(image_backbone.spec, id="double")
    try:
        np.testing.assert_array_equal(trainer.sets.run(spec, rows), double(rows))
        assert 1 <= client.most_in_flight <= TRAINING_MESSAGES_IN_FLIGHT
    finally:
        trainer.close()
        client.close()
        server.close()


def test_a_stopping_runner_serves_its_workers_until_they_hang_up(tmp_path) -> None:
    """A server's processes all stop at once: a worker's training job still in flight
    gets its rows embedded, and the runner ends as soon as the worker hangs up."""
    batcher = Batcher(
        double, name="double", max_batch_size=8, max_latency_ms=0, training_slice_ms=5
    )
    server = RunnerServer(tmp_path / "runner.sock", {"double": batcher})
    client = RunnerClient(server.address)
    rows = np.ones((4, 3), np.uint8)
    client.embed("double", rows).result(10)  # connected
    stopping = threading.Thread(target=server.close, kwargs={"drain_timeout_s": 60})
    started = time.monotonic()
    stopping.start()
    time.sleep(0.2)
    np.testing.assert_array_equal(client.embed("double", rows, "training").result(10), double(rows))
    client.close()
    stopping.join(10)
    assert not stopping.is_alive() and time.monotonic() - started < 10
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.submit(rows).result(1)
