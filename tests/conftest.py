"""Fixtures shared by the suite: backbones exported once per session, and a real BentoML
server on a free loopback port with its own data directory."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local_postgres import postgres
from models import cpu
from models.export import ensure_onnx, ensure_split
from models.runtime import Backbone
from service.settings import get_backbone, list_backbones
from tests.postgres import SUITE_SERVER, database_for
from tests.server import BENTOML, ROOT, Server, start_test_server, stop_server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="run the attack, crash and load tests at full length (make test-long)",
    )
    parser.addoption(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the store every test and server uses: a SQLite file each (the default), or a"
        " database each on one PostgreSQL server the suite starts (make test runs both)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test given a store (a SQLite file, or a PostgreSQL database in the second pass)
    # tests its SQL: it runs in both passes.
    for item in items:
        if "database_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgresql)


def pytest_report_header(config: pytest.Config) -> str:
    # Which INT8 kernels ONNX Runtime runs here (models/cpu.py); tests hold on any x86-64.
    return f"cpu: {cpu.describe()}"


@pytest.fixture(scope="session", autouse=True)
def suite_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """Under --database postgresql, one real PostgreSQL server for the whole session."""
    engine = request.config.getoption("--database")
    if engine == "sqlite":
        yield engine
        return
    with postgres() as url:
        os.environ[SUITE_SERVER] = url
        try:
            yield engine
        finally:
            del os.environ[SUITE_SERVER]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """A new, empty store: a SQLite file, or a database of the suite's PostgreSQL server."""
    return database_for(tmp_path / "database") or f"sqlite:///{tmp_path / 'graft.sqlite3'}"


@pytest.fixture(scope="session")
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under --long: the trust tests run more kills, cases and seconds."""
    return request.config.getoption("--long")


# Exported backbones are named by the hash of their weights and exporter (models/export.py),
# so one cache serves every run: the one `make serve` fills, unless GRAFT_TEST_BACKBONE_DIR
# names another. A changed backbone gets new files; stale ones are only disk.
BACKBONE_CACHE = Path(os.environ.get("GRAFT_TEST_BACKBONE_DIR", ROOT / ".graft" / "backbones"))


@pytest.fixture(scope="session")
def backbone_dir() -> Path:
    """Every registered backbone exported to ONNX (and the trunk and top of those that
    fine-tune), once across runs."""
    BACKBONE_CACHE.mkdir(parents=True, exist_ok=True)
    for spec in list_backbones():
        ensure_onnx(spec, BACKBONE_CACHE)
        ensure_split(spec, BACKBONE_CACHE)
    return BACKBONE_CACHE


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
    "GRAFT_MAX_ARCHIVE_BYTES": str(4 * 1024 * 1024),
    "GRAFT_MAX_ARCHIVE_FILES": "200",
    # On, so that the check for leaked keys below also reads a line per request.
    "GRAFT_ACCESS_LOG": "true",
}
# What any tenant key looks like: graft_<tenant id>_<secret>.
TENANT_KEY = re.compile(r"graft_[0-9a-f]{32}_[A-Za-z0-9_-]{20,}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, backbone_dir: Path) -> Iterator[Server]:
    """One real server for the end-to-end tests; each test makes its own tenants."""
    # Three image backbones, so that `auto` ranks them and keeps a shortlist of two; both
    # text backbones, so that a text head's `auto` has a choice too; the speech encoder.
    loaded = (
        "efficientnet_lite0,mobilenet_v2,efficientnet_lite1,minilm_l6,mpnet_base_v2,"
        "resemblyzer_ge2e"
    )
    running = start_test_server(
        BENTOML,
        tmp_path_factory.mktemp("data"),
        backbone_dir,
        {**TEST_LIMITS, "GRAFT_BACKBONES": loaded},
    )
    yield running
    stop_server(running)
    # Everything the suite sent went through this server: no key may be in its log.
    log = running.log()
    assert running.admin_key not in log, "the admin key was logged"
    assert not TENANT_KEY.findall(log), "a tenant key was logged"


@pytest.fixture(scope="session")
def polling_server(
    tmp_path_factory: pytest.TempPathFactory, backbone_dir: Path
) -> Iterator[Server]:
    """A server whose heads always answer 202 and train in the background, as big heads
    do: for the client, the `graft` command and the console, which show its progress."""
    running = start_test_server(
        BENTOML,
        tmp_path_factory.mktemp("polling"),
        backbone_dir,
        {
            "GRAFT_BACKBONES": "efficientnet_lite0,minilm_l6,resemblyzer_ge2e",
            "GRAFT_SYNC_TRAINING_TIMEOUT_S": "0",
        },
    )
    yield running
    stop_server(running)
