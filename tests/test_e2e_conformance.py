"""The API document says what the server does: checked by an independent fuzzer.

schemathesis's own command runs every check in all its phases (examples, coverage,
fuzzing, and stateful, which follows the document's links from created tenants and
heads), once with a tenant key and once with the admin key, against a server of its own.
Any failure fails the test. `make test` gives it a small budget, `make test-long`
(--long) the issue's. The document itself is validated as OpenAPI 3.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate

from graft import Client
from tests.server import BENTOML, ROOT, start_test_server, stop_server

pytestmark = pytest.mark.e2e

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, backbone_dir):
    server = start_test_server(
        BENTOML,
        tmp_path_factory.mktemp("conformance"),
        backbone_dir,
        {"GRAFT_BACKBONES": "efficientnet_lite0,minilm_l6", "GRAFT_RATE_LIMIT_PER_S": "0"},
    )
    yield server
    stop_server(server)


def test_the_document_is_valid_openapi(fuzzed) -> None:
    validate(httpx.get(f"{fuzzed.base_url}/v1/openapi.json").json())


@pytest.mark.parametrize("who", ["tenant", "admin"])
def test_the_server_does_what_the_document_says(fuzzed, long_run, who, tmp_path) -> None:
    if who == "admin":
        key = fuzzed.admin_key
    else:
        with Client(fuzzed.base_url, fuzzed.admin_key) as admin:
            key = admin.create_tenant("conformance").api_key
    command = [
        SCHEMATHESIS, "run", f"{fuzzed.base_url}/v1/openapi.json",
        "--url", f"{fuzzed.base_url}/v1",
        "-H", f"Authorization: Bearer {key}",
        "--checks", "all",
        # Replaced by tests/conformance_hooks.py: refusals of what no schema can say
        # (bytes that are no photo, one label) are not disagreements with the document.
        "--exclude-checks", "positive_data_acceptance",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", "200" if long_run else "5",
        "--seed", "14",
        "--no-color",
        "--report-dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.conformance_hooks"},
        capture_output=True,
        text=True,
        timeout=3000 if long_run else 900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-2000:]
