"""Load on loopback: many tenants predict while others create heads and add examples.
Zero errors; every answer is exactly what that tenant's head gives for those inputs alone
(so no row went to another request or head); the server's memory levels off."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import psutil
import pytest

from tests.inputs import COOKING, SPORTS, b64, crops, image_examples
from tests.server import BENTOML, start_test_server, stop_server

pytestmark = pytest.mark.e2e

# After warm-up, memory may grow this much: the writers' new heads and embeddings (SQLite
# pages, head locks) and ONNX Runtime's arena meeting a batch shape for the first time
# (steps of about 11 MiB). Measured: +10 MiB from 48 s to 150 s of this load (SECURITY.md).
MEMORY_GROWTH_BOUND_MIB = 48


def _server_rss_mib(server) -> float:
    process = psutil.Process(server.process.pid)
    tree = [process, *process.children(recursive=True)]
    return sum(p.memory_info().rss for p in tree) / 2**20


def _text_examples(tenant: int) -> list[dict]:
    return [
        {"label": f"t{tenant}:{label}", "text": text}
        for label, texts in (("sports", SPORTS), ("cooking", COOKING))
        for text in texts[:3]
    ]


def _image_examples(tenant: int) -> list[dict]:
    return [
        {**example, "label": f"t{tenant}:{example['label']}"}
        for example in image_examples(3, seed=tenant)
    ]


TEXT_INPUTS = [{"text": t} for t in SPORTS[3:] + COOKING[3:]]
IMAGE_INPUTS = [
    {"image": b64(x)} for x in crops("china.jpg", 3, seed=90) + crops("flower.jpg", 3, seed=91)
]


class Load:
    def __init__(self, server, tenants: list[tuple], seconds: float) -> None:
        self.server = server
        self.tenants = tenants  # (api_key, head, inputs, expected scores per input)
        self.deadline = time.monotonic() + seconds
        self.errors: list[str] = []
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

    def fail(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)

    def predictor(self, seed: int) -> None:
        rng = random.Random(seed)
        clients = {key: self.server.client(key) for key, *_ in self.tenants}
        while time.monotonic() < self.deadline:
            key, head, inputs, expected = rng.choice(self.tenants)
            chosen = rng.sample(range(len(inputs)), rng.randint(1, 3))
            response = clients[key].post(
                f"/v1/heads/{head['id']}/predict",
                json={"inputs": [inputs[i] for i in chosen], "top_k": 2},
            )
            if response.status_code != 200:
                self.fail(f"predict {response.status_code}: {response.text[:200]}")
                continue
            for i, prediction in zip(chosen, response.json()["predictions"], strict=True):
                got = {item["label"]: item["score"] for item in prediction["top_k"]}
                if got.keys() != expected[i].keys() or any(
                    abs(got[label] - expected[i][label]) > 1e-3 for label in got
                ):
                    self.fail(f"head {head['id']} input {i}: got {got}, alone {expected[i]}")
            with self.lock:
                self.counts["predictions"] += len(chosen)
        for client in clients.values():
            client.close()

    def writer(self, seed: int) -> None:
        rng = random.Random(seed)
        with self.server.new_tenant(f"writer-{seed}") as client:
            heads: list[str] = []
            while time.monotonic() < self.deadline:
                fresh = [
                    {"label": label, "text": f"{rng.choice(texts)} ({rng.getrandbits(32)})"}
                    for label, texts in (("sports", SPORTS), ("cooking", COOKING))
                    for _ in range(2)
                ]
                if heads and rng.random() < 0.6:
                    response = client.post(
                        f"/v1/heads/{rng.choice(heads)}/examples", json={"examples": fresh}
                    )
                else:
                    # Frozen: writes that train in a second or two, so that each is answered
                    # within the request under load (readers' heads may be fine-tuned).
                    body = {
                        "name": "w",
                        "backbone": "minilm_l6",
                        "examples": fresh,
                        "fine_tune": "off",
                    }
                    response = client.post("/v1/heads", json=body)
                    if response.status_code == 201:
                        heads.append(response.json()["id"])
                if response.status_code not in (200, 201):
                    self.fail(f"write {response.status_code}: {response.text[:200]}")
                with self.lock:
                    self.counts["writes"] += 1


def _setup_tenants(server, n_text: int, n_image: int) -> list[tuple]:
    tenants = []
    for i in range(n_text + n_image):
        is_image = i >= n_text
        backbone = "efficientnet_lite0" if is_image else "minilm_l6"
        examples = _image_examples(i) if is_image else _text_examples(i)
        inputs = IMAGE_INPUTS if is_image else TEXT_INPUTS
        with server.admin() as admin:
            key = admin.post("/v1/tenants", json={"name": f"reader-{i}"}).json()["api_key"]
        with server.client(key) as client:
            body = {"name": "r", "backbone": backbone, "examples": examples, "fine_tune": "off"}
            head = client.post("/v1/heads", json=body).json()
            # What this head answers for each input sent alone: the reference under load.
            expected = []
            for x in inputs:
                answer = client.post(
                    f"/v1/heads/{head['id']}/predict", json={"inputs": [x], "top_k": 2}
                ).json()
                expected.append({t["label"]: t["score"] for t in answer["predictions"][0]["top_k"]})
            # One full batch: ONNX Runtime's arena grows to its largest shape now, not
            # at some random moment of the load (a one-time step of about 37 MiB).
            full = [inputs[j % len(inputs)] for j in range(32)]
            client.post(f"/v1/heads/{head['id']}/predict", json={"inputs": full})
        tenants.append((key, head, inputs, expected))
    return tenants


def test_many_tenants_under_load(tmp_path, backbone_dir, long_run) -> None:
    seconds, warm_up_s = (180, 60) if long_run else (12, 5)
    n_text, n_image = (60, 12) if long_run else (6, 2)
    server = start_test_server(BENTOML, tmp_path / "data", backbone_dir)
    try:
        tenants = _setup_tenants(server, n_text, n_image)
        load = Load(server, tenants, seconds)
        threads = [threading.Thread(target=load.predictor, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=load.writer, args=(100 + i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        samples = []
        while any(thread.is_alive() for thread in threads):
            samples.append(_server_rss_mib(server))
            time.sleep(1)
        for thread in threads:
            thread.join()
        log = server.log()
    finally:
        stop_server(server)

    assert not load.errors, load.errors[:5]
    assert load.counts["predictions"] > 100 and load.counts["writes"] > 5, load.counts
    warm = samples[warm_up_s]  # one sample a second
    growth = max(samples[warm_up_s:]) - warm
    print(
        f"\nload: {len(tenants)} reading tenants, {seconds} s, {dict(load.counts)}, 0 errors;"
        f" RSS {warm:.0f} MiB after warm-up, +{growth:.1f} MiB after"
    )
    assert growth < MEMORY_GROWTH_BOUND_MIB, samples
    assert "Traceback" not in log
