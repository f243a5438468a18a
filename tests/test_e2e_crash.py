"""Crash safety, tested as a power cut would: SIGKILL to the whole server at random moments
while tenants write, a restart each time, and a check that nothing acknowledged was lost
and nothing is half-written. And a clean stop: SIGTERM lets in-flight requests finish."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import httpx
import pytest
import sqlalchemy as sa

from service.settings import get_backbone
from tests.inputs import COOKING, SPORTS, b64, crops, image_examples
from tests.postgres import database_for
from tests.server import BENTOML, kill_server, start_test_server, stop_server

pytestmark = pytest.mark.e2e

TEXT = "minilm_l6"
DIM = get_backbone(TEXT).embedding_dim


def _fresh_examples(rng: random.Random, per_label: int) -> list[dict]:
    """Texts no one has sent before, so every write runs the backbone and trains."""
    return [
        {"label": label, "text": f"{rng.choice(texts)} (note {rng.getrandbits(40)})"}
        for label, texts in (("sports", SPORTS), ("cooking", COOKING))
        for _ in range(per_label)
    ]


class Writers:
    """Threads that create heads and add examples until the server dies under them,
    recording what the server acknowledged: head id -> the version it promised (201: the
    version answered; 202: the examples are stored, so one more than the version
    answered)."""

    def __init__(self, server, api_key: str, acknowledged: dict[str, int], seed: int) -> None:
        self.server = server
        self.api_key = api_key
        self.acknowledged = acknowledged
        self.unexpected: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(random.Random(seed * 10 + i),))
            for i in range(2)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, rng: random.Random) -> None:
        with self.server.client(self.api_key) as client:
            while True:
                with self._lock:
                    known = list(self.acknowledged)
                try:
                    if known and rng.random() < 0.5:
                        response = client.post(
                            f"/v1/heads/{rng.choice(known)}/examples",
                            json={"examples": _fresh_examples(rng, 1)},
                        )
                    else:
                        response = client.post(
                            "/v1/heads",
                            json={
                                "name": f"crash-{rng.getrandbits(32)}",
                                "backbone": TEXT,
                                "examples": _fresh_examples(rng, 3),
                                # Frozen heads train in under a second: many writes land
                                # between kills (fine-tuning's jobs are the same jobs).
                                "fine_tune": "off",
                            },
                        )
                except httpx.HTTPError:
                    return  # the server was killed under this request
                if response.status_code in (200, 201, 202):
                    head = response.json()
                    promised = head["version"] + (response.status_code == 202)
                    with self._lock:
                        previous = self.acknowledged.get(head["id"], 0)
                        self.acknowledged[head["id"]] = max(previous, promised)
                else:
                    self.unexpected.append(f"{response.status_code}: {response.text[:200]}")


def _settled_heads(client: httpx.Client, seconds: float = 120) -> dict[str, dict]:
    """The tenant's heads once none is training: jobs the kill interrupted are taken over
    by the restarted server and finished."""
    deadline = time.monotonic() + seconds
    while True:
        heads = {h["id"]: h for h in client.get("/v1/heads").json()["heads"]}
        training = [h for h in heads.values() if h["status"] == "training"]
        if not training:
            return heads
        assert time.monotonic() < deadline, f"still training: {training}"
        time.sleep(0.5)


def _check_everything_acknowledged_survived(server, api_key: str, acknowledged: dict) -> None:
    with server.client(api_key) as client:
        heads = _settled_heads(client)
        for head_id, version in acknowledged.items():
            head = heads.get(head_id)
            assert head is not None, f"acknowledged head {head_id} is gone"
            assert head["status"] == "ready" and head["version"] >= version, (head, version)
            answer = client.post(
                f"/v1/heads/{head_id}/predict", json={"inputs": [{"text": "a late goal"}]}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["predictions"][0]["label"] in head["labels"]
        for head in heads.values():
            # A job the kill interrupted is finished; a head created with no job stored
            # yet (its request got no answer) is resolved; nothing is left half-done.
            assert head["status"] in ("ready", "failed"), head
            if head["status"] == "ready":
                assert head["version"] >= 1 and head["metrics"] and len(head["labels"]) == 2
            else:
                assert head["version"] == 0 and head["error"], head


def _check_database(data_dir, depth_widths: list[int]) -> None:
    engine = sa.create_engine(database_for(data_dir) or f"sqlite:///{data_dir / 'graft.sqlite3'}")
    try:
        with engine.connect() as db:
            if engine.dialect.name == "sqlite":
                assert db.exec_driver_sql("PRAGMA integrity_check").one() == ("ok",)
            rows = db.exec_driver_sql(
                "SELECT labels, weights, bias, depths FROM heads WHERE version > 0"
            )
            for labels, weights, bias, depths in rows:
                n_labels = len(json.loads(labels))
                # The embedding, then the deepest depths the head reads.
                columns = DIM + sum(depth_widths[len(depth_widths) - depths :] if depths else [])
                assert len(bias) == 4 * n_labels and len(weights) == 4 * columns * n_labels
    finally:
        engine.dispose()


@pytest.mark.postgresql  # what a kill leaves in the store
def test_sigkill_at_random_moments_loses_nothing_acknowledged(
    tmp_path, backbone_dir, long_run, text_backbone
) -> None:
    kills = 20 if long_run else 2
    rng = random.Random(4)
    data_dir = tmp_path / "data"
    server = start_test_server(BENTOML, data_dir, backbone_dir)
    with server.admin() as admin:
        api_key = admin.post("/v1/tenants", json={"name": "crash"}).json()["api_key"]
    acknowledged: dict[str, int] = {}
    unexpected: list[str] = []
    try:
        for round_ in range(kills):
            writers = Writers(server, api_key, acknowledged, seed=round_)
            writers.start()
            time.sleep(rng.uniform(0.5, 3.0))
            kill_server(server)
            writers.join()
            unexpected += writers.unexpected
            server = start_test_server(BENTOML, data_dir, backbone_dir)
            _check_everything_acknowledged_survived(server, api_key, acknowledged)
    finally:
        stop_server(server)
    assert not unexpected, unexpected
    assert len(acknowledged) >= kills  # the writers really wrote between the kills
    _check_database(data_dir, text_backbone.depth_widths)
    versions = sum(acknowledged.values())
    print(
        f"\ncrash: {kills} SIGKILLs survived; {len(acknowledged)} heads and {versions} versions"
        " acknowledged, all present"
    )


def test_sigterm_lets_in_flight_requests_finish(tmp_path, backbone_dir) -> None:
    server = start_test_server(BENTOML, tmp_path / "data", backbone_dir)
    answers: dict[str, httpx.Response] = {}
    try:
        tenant = server.new_tenant("draining")
        with tenant:
            head = tenant.post(
                "/v1/heads",
                json={
                    "name": "h",
                    "backbone": "efficientnet_lite0",
                    "examples": image_examples(2, seed=1),
                },
            ).json()

            def slow_requests() -> None:
                answers["create"] = tenant.post(
                    "/v1/heads",
                    json={
                        "name": "slow",
                        "backbone": "efficientnet_lite0",
                        "examples": image_examples(40, seed=2),
                    },
                )

            predict_sent = threading.Event()

            def predict() -> None:
                images = [{"image": b64(x)} for x in crops("flower.jpg", 16, seed=3)]

                def body():  # the request's whole body, then the event
                    yield json.dumps({"inputs": images}).encode()
                    predict_sent.set()

                answers["predict"] = tenant.post(
                    f"/v1/heads/{head['id']}/predict",
                    content=body(),
                    headers={"Content-Type": "application/json"},
                )

            threads = [threading.Thread(target=slow_requests), threading.Thread(target=predict)]
            for thread in threads:
                thread.start()
            # Both requests are in the server: the new head is stored (its training has
            # begun), the predict's body sent.
            deadline = time.monotonic() + 120
            while not any(h["name"] == "slow" for h in tenant.get("/v1/heads").json()["heads"]):
                assert time.monotonic() < deadline, "the slow head never arrived"
                time.sleep(0.05)
            assert predict_sent.wait(120)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=60) == 0
            for thread in threads:
                thread.join()
    finally:
        stop_server(server)
    assert answers["create"].status_code == 201, answers["create"].text
    assert answers["predict"].status_code == 200, answers["predict"].text
    assert len(answers["predict"].json()["predictions"]) == 16
    assert "Completed cleanup hook: shutdown" in server.log()
    assert "Traceback" not in server.log()


@pytest.mark.postgresql  # what a kill leaves in the store
def test_examples_answered_202_survive_a_kill_and_their_head_is_trained(
    tmp_path, backbone_dir
) -> None:
    """202 means stored: a server killed right after it finishes the job when it starts
    again (its old processes' leases are freed at once, and a worker takes the job)."""
    data_dir = tmp_path / "data"
    always_202 = {"GRAFT_SYNC_TRAINING_TIMEOUT_S": "0"}
    server = start_test_server(BENTOML, data_dir, backbone_dir, always_202)
    try:
        tenant = server.new_tenant("killed")
        api_key = tenant.headers["Authorization"].removeprefix("Bearer ")
        examples = _fresh_examples(random.Random(7), per_label=50)
        # Frozen: the job is what is tested, not its length (fine-tuning 100 texts takes
        # a minute or two on 2 cores; its jobs are the same jobs).
        body = {"name": "h", "backbone": TEXT, "examples": examples, "fine_tune": "off"}
        answer = tenant.post("/v1/heads", json=body)
        assert answer.status_code == 202, answer.text
    finally:
        kill_server(server)  # at once: the 100 texts take seconds to embed and fit
    head_id = answer.json()["id"]
    server = start_test_server(BENTOML, data_dir, backbone_dir, always_202)
    try:
        with server.client(api_key) as client:
            head = _settled_heads(client)[head_id]
            assert head["status"] == "ready" and head["version"] >= 1, head
            assert head["metrics"]["n_examples"] == 100
    finally:
        stop_server(server)
    log = server.log()  # read once the workers have flushed it
    assert "freed 1 training jobs this replica held" in log and "taking over training job" in log
