"""The API workers and the backbone runner as services of their own, as the Kubernetes
GPU variant runs them (deploy/kubernetes/gpu): the runner served alone, the API server
reaching it over a TCP link with a key, starting no runner of its own."""

from __future__ import annotations

import secrets

import psutil
import pytest

from tests.inputs import COOKING, SPORTS
from tests.server import BENTOML, free_port, start_test_server, stop_server

pytestmark = pytest.mark.e2e


def test_api_servers_use_a_runner_served_on_its_own(tmp_path, backbone_dir) -> None:
    link = {
        "GRAFT_RUNNER_LINK": f"tcp://127.0.0.1:{free_port()}",
        "GRAFT_RUNNER_KEY": secrets.token_urlsafe(24),
    }
    runner = start_test_server(
        [*BENTOML[:2], "service.service:BackboneRunner"], tmp_path / "runner", backbone_dir, link
    )
    try:
        api = start_test_server(
            BENTOML, tmp_path / "api", backbone_dir, {**link, "GRAFT_RUNNER_URL": runner.base_url}
        )
        try:
            processes = psutil.Process(api.process.pid).children(recursive=True)
            assert processes and not any(
                "graft-runner" in " ".join(p.cmdline()) for p in processes
            ), "the API server started a runner of its own"
            with api.new_tenant("split") as tenant:
                examples = [{"label": "sports", "text": t} for t in SPORTS[:4]] + [
                    {"label": "cooking", "text": t} for t in COOKING[:4]
                ]
                head = tenant.post(
                    "/v1/heads",
                    json={
                        "name": "h",
                        "backbone": "minilm_l6",
                        "examples": examples,
                        "fine_tune": "off",
                    },
                )
                assert head.status_code == 201, head.text
                answer = tenant.post(
                    f"/v1/heads/{head.json()['id']}/predict",
                    json={"inputs": [{"text": SPORTS[5]}]},
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["predictions"][0]["label"] == "sports"
            with api.admin() as admin:  # the remote runner's batchers, through BentoML
                stats = admin.get("/v1/stats").json()
            assert stats["batchers"]["minilm_l6"]["rows"] > 0
        finally:
            stop_server(api)
    finally:
        stop_server(runner)
