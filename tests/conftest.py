"""Fixtures shared by the suite: backbones exported once per session, and a real BentoML
server on a free loopback port with its own data directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.export import ensure_onnx
from models.registry import get_backbone, list_backbones
from models.runtime import Backbone
from tests.server import BENTOML, Server, start_server, stop_server


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every registered backbone exported to ONNX once for the whole session."""
    cache = Path(os.environ.get("GRAFT_TEST_BACKBONE_DIR", tmp_path_factory.mktemp("backbones")))
    for spec in list_backbones():
        ensure_onnx(spec, cache)
    return cache


@pytest.fixture(scope="session")
def image_backbone(backbone_dir: Path) -> Backbone:
    spec = get_backbone("efficientnet_lite0")
    return Backbone(spec, ensure_onnx(spec, backbone_dir))


@pytest.fixture(scope="session")
def text_backbone(backbone_dir: Path) -> Backbone:
    spec = get_backbone("minilm_l6")
    return Backbone(spec, ensure_onnx(spec, backbone_dir))


# Small limits so the bad-input tests can exceed them cheaply.
TEST_LIMITS = {
    "GRAFT_MAX_BODY_BYTES": str(6 * 1024 * 1024),
    "GRAFT_MAX_IMAGE_PIXELS": str(4_000_000),
    "GRAFT_MAX_TEXT_CHARS": "2000",
    "GRAFT_MAX_PREDICT_INPUTS": "16",
}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, backbone_dir: Path) -> Iterator[Server]:
    """One real server for the end-to-end tests; each test makes its own tenants."""
    running = start_server(BENTOML, tmp_path_factory.mktemp("data"), backbone_dir, TEST_LIMITS)
    yield running
    stop_server(running)
