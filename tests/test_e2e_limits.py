"""Per-tenant limits and key revocation, on a server of its own with small limits."""

from __future__ import annotations

import time

import pytest

from graft import Client, GraftError
from tests.inputs import assert_error, text_examples
from tests.server import BENTOML, start_test_server, stop_server

pytestmark = pytest.mark.e2e

LIMITS = {
    "GRAFT_MAX_HEADS_PER_TENANT": "2",
    "GRAFT_MAX_EXAMPLES_PER_HEAD": "10",
    "GRAFT_MAX_UNLABELED_PER_HEAD": "12",
    "GRAFT_RATE_LIMIT_PER_S": "4",
    "GRAFT_RATE_LIMIT_BURST": "6",
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory, backbone_dir):
    server = start_test_server(BENTOML, tmp_path_factory.mktemp("limited"), backbone_dir, LIMITS)
    yield server
    stop_server(server)


def _head(client, examples) -> dict:
    response = client.post(
        "/v1/heads",
        json={"name": "h", "backbone": "minilm_l6", "examples": examples, "fine_tune": "off"},
    )
    assert response.status_code == 201, response.text
    return response.json()


def _wait_for_tokens() -> None:
    time.sleep(6 / 4 + 0.2)  # the whole burst refilled


def test_rate_limit_answers_429_with_retry_after_per_tenant(limited) -> None:
    with limited.new_tenant("eager") as eager, limited.new_tenant("calm") as calm:
        _wait_for_tokens()
        answers = [eager.get("/v1/heads") for _ in range(10)]
        statuses = [a.status_code for a in answers]
        # The burst of 6 goes through (one more may refill while they run); then 429s.
        assert statuses[:6] == [200] * 6 and 429 in statuses[6:], statuses
        refused = next(a for a in answers if a.status_code == 429)
        assert_error(refused, 429, "rate_limited")
        assert int(refused.headers["Retry-After"]) >= 1
        assert calm.get("/v1/heads").status_code == 200  # another tenant is not slowed
        time.sleep(int(refused.headers["Retry-After"]))
        assert eager.get("/v1/heads").status_code == 200  # Retry-After was long enough


def test_client_waits_out_429s_for_their_retry_after(limited) -> None:
    with limited.new_tenant("patient") as tenant:
        key = tenant.headers["Authorization"].removeprefix("Bearer ")
    _wait_for_tokens()
    with Client(limited.base_url, key, retries=0) as impatient:
        with pytest.raises(GraftError) as refused:
            for _ in range(10):
                impatient.heads()
        assert (refused.value.status, refused.value.code) == (429, "rate_limited")
    _wait_for_tokens()
    with Client(limited.base_url, key) as patient:
        start = time.monotonic()
        for _ in range(10):  # the burst of 6, then 429 answers waited out (Retry-After: 1)
            assert patient.heads() == []
        assert time.monotonic() - start >= 0.9


@pytest.mark.postgresql  # counted in the store
def test_heads_per_tenant(limited) -> None:
    with limited.new_tenant("collector") as tenant:
        first = _head(tenant, text_examples(2))
        _head(tenant, text_examples(2, offset=2))
        _wait_for_tokens()
        refused = tenant.post(
            "/v1/heads",
            json={"name": "third", "backbone": "minilm_l6", "examples": text_examples(2)},
        )
        assert_error(refused, 403, "head_limit_reached")
        assert len(tenant.get("/v1/heads").json()["heads"]) == 2
        assert tenant.delete(f"/v1/heads/{first['id']}").status_code == 204
        _head(tenant, text_examples(2, offset=4))  # room again


@pytest.mark.postgresql  # counted in the store
def test_examples_per_head(limited) -> None:
    with limited.new_tenant("hoarder") as tenant:
        assert_error(
            tenant.post(
                "/v1/heads",
                json={"name": "big", "backbone": "minilm_l6", "examples": text_examples(6)},
            ),
            403,
            "example_limit_reached",
        )
        head = _head(tenant, text_examples(4))  # 8 examples
        path = f"/v1/heads/{head['id']}"
        assert_error(
            tenant.post(f"{path}/examples", json={"examples": text_examples(2, offset=4)}),
            403,
            "example_limit_reached",
        )
        assert tenant.get(path).json() == head
        # Examples the head already holds do not count twice.
        again = tenant.post(f"{path}/examples", json={"examples": text_examples(5)[:3]})
        assert again.status_code == 200 and again.json()["metrics"]["n_examples"] == 8
        _wait_for_tokens()
        grown = tenant.post(f"{path}/examples", json={"examples": text_examples(1, offset=5)})
        assert grown.status_code == 200 and grown.json()["metrics"]["n_examples"] == 10


@pytest.mark.postgresql  # counted in the store
def test_unlabelled_examples_per_head(limited) -> None:
    with limited.new_tenant("gatherer") as tenant:
        head = _head(tenant, text_examples(2))
        url = f"/v1/heads/{head['id']}/unlabeled"
        texts = [{"text": f"message number {i}"} for i in range(13)]
        assert_error(tenant.post(url, json={"examples": texts}), 403, "unlabeled_limit_reached")
        assert tenant.post(url, json={"examples": texts[:12]}).status_code == 200
        _wait_for_tokens()
        assert_error(
            tenant.post(url, json={"examples": texts[12:]}), 403, "unlabeled_limit_reached"
        )
        # Those it holds already do not count twice.
        again = tenant.post(url, json={"examples": texts[:3]})
        assert again.status_code == 200 and again.json()["metrics"]["domain"]["n_unlabeled"] == 12


@pytest.mark.postgresql  # the key is the store's
def test_a_rotated_key_is_revoked_at_once(limited) -> None:
    with limited.admin() as admin:
        created = admin.post("/v1/tenants", json={"name": "rotating"}).json()
        with limited.client(created["api_key"]) as old:
            head = _head(old, text_examples(2))
            rotated = admin.post(f"/v1/tenants/{created['id']}/key")
            assert rotated.status_code == 200
            assert rotated.json()["api_key"] != created["api_key"]
            assert_error(old.get("/v1/heads"), 401, "invalid_api_key")
        with limited.client(rotated.json()["api_key"]) as new:
            assert new.get(f"/v1/heads/{head['id']}").json() == head
        assert_error(admin.post("/v1/tenants/nope/key"), 404, "tenant_not_found")
        with limited.new_tenant("not-admin") as tenant:
            assert_error(tenant.post(f"/v1/tenants/{created['id']}/key"), 403, "admin_key_required")
