"""Nothing is left behind: a server whose top process is SIGKILLed (the OOM killer, `kill
-9`, a supervisor that signals one process) is gone whole, its port free; and a head's
fine-tuning leaves no PyTorch in the server once it is done (service/lifetime.py,
service/fine_tuning.py)."""

from __future__ import annotations

import signal
import socket

import httpx
import pytest

from tests.inputs import text_examples
from tests.server import (
    MAKE_SERVE,
    alive,
    post_in_background,
    process_tree,
    start_test_server,
    wait_for_fine_tuning,
    wait_until_ended,
)

pytestmark = pytest.mark.e2e


def test_make_serve_killed_leaves_no_process_and_frees_its_port(
    tmp_path, backbone_dir, suite_database
) -> None:
    if suite_database != "sqlite":
        pytest.skip("the same processes on either store: the SQLite pass runs it")
    server = start_test_server(
        MAKE_SERVE, tmp_path / "data", backbone_dir, {"GRAFT_BACKBONES": "minilm_l6"}
    )
    make = server.process
    tenant = server.new_tenant("killed")
    body = {"name": "h", "backbone": "minilm_l6", "examples": text_examples(4), "fine_tune": "on"}
    post_in_background(tenant, "/v1/heads", body)
    wait_for_fine_tuning(make.pid)
    processes = process_tree(make.pid)
    # make, BentoML's arbiter, its runner and API workers, a worker's fine-tuning process.
    commands = [" ".join(p.cmdline()) for p in processes]
    assert sum("_bentoml_impl.worker" in c for c in commands) >= 2, commands
    make.send_signal(signal.SIGKILL)
    make.wait()
    try:
        seconds = wait_until_ended(processes)
    finally:
        for process in alive(processes):  # none, unless the test failed
            process.kill()
    print(f"\nmake serve SIGKILLed: its {len(processes)} processes gone in {seconds:.2f} s")
    port = int(server.base_url.rsplit(":", 1)[1])
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/readyz", timeout=5)
    with socket.socket() as s:  # as a new server would take it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    tenant.close()
