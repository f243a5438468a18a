"""The suite's servers: a real Graft server of this checkout (deploy/local_server.py) with
the settings every test wants, and helpers to watch its processes and heads."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import psutil

from deploy.local_server import (  # noqa: F401 (the tests' one place to import them from)
    BENTOML,
    MAKE_SERVE,
    ROOT,
    Server,
    alive,
    free_port,
    kill_server,
    poll_until_trained,
    process_tree,
    start_server,
    stop_server,
)
from tests.postgres import database_for

# What a test's server loads unless the test says otherwise: the cheapest backbone of each
# modality (a server starts in seconds less without the others). A test that needs the
# server's own default set passes GRAFT_BACKBONES=None (the variable is then left unset).
TEST_BACKBONES = "efficientnet_lite0,minilm_l6"


def start_test_server(
    command: list[str],
    data_dir: Path,
    backbone_dir: Path,
    env: dict[str, str | None] | None = None,
    **options,
) -> Server:
    """A server as start_server starts it, with the suite's settings under `env`'s, and
    under --database postgresql a database of its own on the suite's PostgreSQL server."""
    defaults: dict[str, str | None] = {
        "GRAFT_BACKBONES": TEST_BACKBONES,
        # A head's request waits for its training, however long a busy machine makes it:
        # tests read the finished head, and never race the 20 s default (202). Those that
        # test 202 set 0. Under nginx's 300 s in front of a fleet.
        "GRAFT_SYNC_TRAINING_TIMEOUT_S": "240",
    }
    if "GRAFT_DATABASE_URL" not in (env or {}) and (url := database_for(data_dir)) is not None:
        defaults["GRAFT_DATABASE_URL"] = url
    return start_server(command, data_dir, backbone_dir, {**defaults, **(env or {})}, **options)


def wait_until_ended(processes: list[psutil.Process], seconds: float = 60) -> float:
    """The seconds until none of `processes` runs; AssertionError after `seconds`."""
    start = time.monotonic()
    while running := alive(processes):
        assert time.monotonic() - start < seconds, f"still running: {running}"
        time.sleep(0.1)
    return time.monotonic() - start


def fine_tuning_processes(pid: int) -> list[psutil.Process]:
    """The fine-tuning processes under process `pid`."""
    found = []
    for process in alive(process_tree(pid)):
        with contextlib.suppress(psutil.Error):
            if "service.fine_tuning" in " ".join(process.cmdline()):
                found.append(process)
    return found


def wait_for_fine_tuning(pid: int, seconds: float = 300) -> None:
    """Until a fine-tuning process runs under `pid` (a head's job has reached it)."""
    deadline = time.monotonic() + seconds
    while not fine_tuning_processes(pid):
        assert time.monotonic() < deadline, "no fine-tuning process started"
        time.sleep(0.2)


def post_in_background(client: httpx.Client, path: str, body: dict) -> None:
    """A request whose answer never comes: the server is killed under it."""

    def post() -> None:
        with contextlib.suppress(httpx.HTTPError):
            client.post(path, json=body)

    threading.Thread(target=post, daemon=True).start()
