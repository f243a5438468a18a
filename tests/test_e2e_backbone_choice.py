"""A server that loads only the backbones GRAFT_BACKBONES names: it lists, trains and serves
those, and says so clearly of a head that sits on another."""

from __future__ import annotations

import pytest

from tests.conftest import TEST_LIMITS
from tests.inputs import COOKING, SPORTS, image_examples
from tests.server import BENTOML, start_test_server, stop_server

pytestmark = pytest.mark.e2e


def test_a_server_loads_only_the_backbones_it_is_given(tmp_path, backbone_dir) -> None:
    data_dir = tmp_path / "data"
    # The server's own default set (the variable unset).
    everything = start_test_server(
        BENTOML, data_dir, backbone_dir, {**TEST_LIMITS, "GRAFT_BACKBONES": None}
    )
    try:
        with everything.new_tenant("choice") as tenant:
            key = tenant.headers["Authorization"].removeprefix("Bearer ")
            texts = [{"label": "sports", "text": t} for t in SPORTS[:3]]
            texts += [{"label": "cooking", "text": t} for t in COOKING[:3]]
            text_head = tenant.post(
                "/v1/heads",
                json={"name": "t", "backbone": "minilm_l6", "examples": texts, "fine_tune": "off"},
            ).json()["id"]
            image_head = tenant.post(
                "/v1/heads",
                json={
                    "name": "i",
                    "backbone": "efficientnet_lite0",
                    "examples": image_examples(2, seed=1),
                },
            ).json()["id"]
    finally:
        stop_server(everything)

    only_lite0 = start_test_server(
        BENTOML, data_dir, backbone_dir, {**TEST_LIMITS, "GRAFT_BACKBONES": "efficientnet_lite0"}
    )
    try:
        with only_lite0.client(key) as tenant:
            listed = tenant.get("/v1/backbones").json()["backbones"]
            assert [b["id"] for b in listed] == ["efficientnet_lite0"]
            image = image_examples(1, seed=2)[0]["image"]
            served = tenant.post(
                f"/v1/heads/{image_head}/predict", json={"inputs": [{"image": image}]}
            )
            assert served.status_code == 200, served.text
            refused = tenant.post(
                f"/v1/heads/{text_head}/predict", json={"inputs": [{"text": "a goal"}]}
            )
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["code"] == "backbone_not_served"
            auto = tenant.post(
                "/v1/heads", json={"name": "a", "backbone": "auto", "examples": texts}
            )
            assert auto.status_code == 422 and "no text backbone" in auto.text
    finally:
        stop_server(only_lite0)
    # The operator is told at start which stored heads this server leaves unserved.
    assert "heads on backbones this server does not load (GRAFT_BACKBONES): minilm_l6 (1)" in (
        only_lite0.log()
    )


def test_a_bad_backbones_file_stops_the_server_naming_the_entry(tmp_path, backbone_dir) -> None:
    declared = tmp_path / "backbones.toml"
    declared.write_text('[mine]\nkind = "timm"\nfamily = "ResNet"\nembedding_dim = 512\n')
    with pytest.raises(RuntimeError, match="server exited") as raised:
        start_test_server(
            BENTOML,
            tmp_path / "data",
            backbone_dir,
            {"GRAFT_BACKBONES_FILE": str(declared), "GRAFT_BACKBONES": "mine"},
        )
    assert "entry 'mine': architecture: Field required" in str(raised.value)
