"""Training off the request thread (202, then poll) and durability across a restart."""

from __future__ import annotations

import pytest

from tests.conftest import TEST_LIMITS
from tests.inputs import b64, crops, image_examples
from tests.server import BENTOML, poll_until_trained, start_test_server, stop_server

# The SQLite pass only: on PostgreSQL, the crash tests restart servers on a store of
# acknowledged heads and jobs (tests/test_e2e_crash.py).
pytestmark = pytest.mark.e2e


def test_202_then_poll_and_heads_survive_a_restart(tmp_path, backbone_dir) -> None:
    data_dir = tmp_path / "data"
    # Answer at once: every head comes back 202 and trains in the background.
    env = {**TEST_LIMITS, "GRAFT_SYNC_TRAINING_TIMEOUT_S": "0"}
    server = start_test_server(BENTOML, data_dir, backbone_dir, env)
    try:
        with server.admin() as admin:
            api_key = admin.post("/v1/tenants", json={"name": "patient"}).json()["api_key"]
        with server.client(api_key) as client:
            response = client.post(
                "/v1/heads",
                json={
                    "name": "bg",
                    "backbone": "efficientnet_lite0",
                    "examples": image_examples(4, seed=4),
                },
            )
            assert response.status_code == 202, response.text
            assert response.json()["status"] == "training" and response.json()["version"] == 0
            head = poll_until_trained(client, response.json()["id"])
            assert head["status"] == "ready" and head["version"] == 1

            more = client.post(
                f"/v1/heads/{head['id']}/examples", json={"examples": image_examples(1, seed=9)}
            )
            assert more.status_code == 202
            # While the new version trains, the previous one keeps serving.
            probe = {"inputs": [{"image": b64(crops("china.jpg", 1, seed=31)[0])}]}
            assert client.post(f"/v1/heads/{head['id']}/predict", json=probe).status_code == 200
            head = poll_until_trained(client, head["id"])
            assert head["version"] == 2 and head["metrics"]["n_examples"] == 10
            before = client.post(f"/v1/heads/{head['id']}/predict", json=probe).json()
    finally:
        stop_server(server)

    server = start_test_server(BENTOML, data_dir, backbone_dir, TEST_LIMITS)
    try:
        with server.client(api_key) as client:
            assert client.get(f"/v1/heads/{head['id']}").json() == head
            after = client.post(f"/v1/heads/{head['id']}/predict", json=probe).json()
            assert after == before
            assert after["predictions"][0]["label"] == "temple"
    finally:
        stop_server(server)
