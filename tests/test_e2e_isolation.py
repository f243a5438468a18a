"""A tenant only ever sees its own heads; keys and admin routes are enforced."""

from __future__ import annotations

import uuid

import pytest

from tests.inputs import assert_error, text_examples

# Each test here reads or writes the store: run again on PostgreSQL (make test).
pytestmark = [pytest.mark.e2e, pytest.mark.postgresql]


def test_another_tenants_head_answers_404_and_stays_unchanged(server) -> None:
    owner = server.new_tenant("owner")
    intruder = server.new_tenant("intruder")
    with owner, intruder:
        head = owner.post(
            "/v1/heads",
            json={
                "name": "private",
                "backbone": "minilm_l6",
                "examples": text_examples(3),
                "fine_tune": "off",
            },
        ).json()
        path = f"/v1/heads/{head['id']}"
        before = owner.get(path).json()

        assert_error(intruder.get(path), 404, "head_not_found")
        assert_error(intruder.delete(path), 404, "head_not_found")
        assert_error(
            intruder.post(f"{path}/predict", json={"inputs": [{"text": "a goal"}]}),
            404,
            "head_not_found",
        )
        assert_error(
            intruder.post(f"{path}/examples", json={"examples": text_examples(1, offset=4)}),
            404,
            "head_not_found",
        )
        assert_error(intruder.get(f"{path}/model.onnx"), 404, "head_not_found")
        assert intruder.get("/v1/heads").json() == {"heads": []}

        assert owner.get(path).json() == before
        assert [h["id"] for h in owner.get("/v1/heads").json()["heads"]] == [head["id"]]


def test_keys_and_admin_routes(server) -> None:
    with server.client() as anonymous:
        assert_error(anonymous.get("/v1/heads"), 401, "missing_api_key")
        assert_error(anonymous.post("/v1/tenants", json={"name": "x"}), 401, "missing_api_key")
    with server.client("graft_nope_nope") as wrong:
        assert_error(wrong.get("/v1/heads"), 401, "invalid_api_key")
    with server.client("not-even-the-shape") as wrong:
        assert_error(wrong.get("/v1/heads"), 401, "invalid_api_key")
    with server.new_tenant("tenant") as tenant:
        assert_error(tenant.post("/v1/tenants", json={"name": "x"}), 403, "admin_key_required")
        assert_error(tenant.get("/v1/tenants"), 403, "admin_key_required")
    with server.admin() as admin:
        assert_error(admin.get("/v1/heads"), 403, "tenant_key_required")


def test_deleting_a_tenant_revokes_its_key_and_removes_its_heads(server) -> None:
    with server.admin() as admin:
        created = admin.post("/v1/tenants", json={"name": "leaving"}).json()
        assert "api_key" not in admin.get("/v1/tenants").json()["tenants"][0]
        with server.client(created["api_key"]) as tenant:
            head = tenant.post(
                "/v1/heads",
                json={"name": "h", "backbone": "minilm_l6", "examples": text_examples(2)},
            ).json()
            assert admin.delete(f"/v1/tenants/{created['id']}").status_code == 204
            assert_error(tenant.get(f"/v1/heads/{head['id']}"), 401, "invalid_api_key")
        assert created["id"] not in [t["id"] for t in admin.get("/v1/tenants").json()["tenants"]]
        assert_error(admin.delete(f"/v1/tenants/{created['id']}"), 404, "tenant_not_found")


def test_keys_never_reach_the_log(server) -> None:
    with server.admin() as admin:
        created = admin.post("/v1/tenants", json={"name": "logged"}).json()
        key = created["api_key"]
        wrong_secret = key[:-4] + "AAAA"
        with server.client(key) as tenant, server.client(wrong_secret) as impostor:
            assert tenant.get("/v1/heads").status_code == 200
            assert_error(impostor.get("/v1/heads"), 401, "invalid_api_key")
        rotated = admin.post(f"/v1/tenants/{created['id']}/key").json()["api_key"]
        with server.client(rotated) as tenant:
            assert tenant.get("/v1/heads").status_code == 200
    log = server.log()
    # The access log is on: every request, refused ones too, has its line.
    assert f"path=/v1/tenants/{created['id']}/key" in log and "status=401" in log
    assert server.admin_key not in log
    for secret in (key, wrong_secret, rotated):
        assert secret not in log
        # Nor the secret part alone: all after "graft_<tenant id>_" (it may hold "_" itself).
        assert secret.split("_", 2)[2] not in log


def test_metrics_are_labelled_by_route_never_by_raw_path(server) -> None:
    """A series per made-up URL would let anyone, without a key, grow the server's memory."""
    made_up = [uuid.uuid4().hex for _ in range(20)]
    with server.client() as anonymous, server.new_tenant("metered") as tenant:
        for head_id in made_up:
            assert_error(anonymous.get(f"/v1/heads/{head_id}"), 401)
            assert_error(tenant.get(f"/v1/heads/{head_id}/nothing"), 404)
            # Predicts are answered before the app's router (service/predict_path.py).
            predict = {"inputs": [{"text": "a goal"}]}
            assert_error(anonymous.post(f"/v1/heads/{head_id}/predict", json=predict), 401)
            assert_error(tenant.post(f"/v1/heads/{head_id}/predict", json=predict), 404)
        metrics = anonymous.get("/v1/metrics")
        bentoml_metrics = anonymous.get("/metrics").text
    assert metrics.status_code == 200
    assert 'route="/heads/{head_id}",status="401"' in metrics.text
    assert 'route="/{path:path}",status="404"' in metrics.text
    for status in (401, 404):
        assert f'route="/heads/{{head_id}}/predict",status="{status}"' in metrics.text
    for head_id in made_up:
        assert head_id not in metrics.text and head_id not in bentoml_metrics
