"""A Graft server of this checkout on a loopback port, started and stopped from Python:
the local fleet's replicas (deploy/local_fleet.py), the benchmarks and the tests.

    server = start_server(BENTOML, data_dir, backbone_dir, {"GRAFT_BACKBONES": "minilm_l6"})
    with server.new_tenant() as tenant: ...
    stop_server(server)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BENTOML = [str(Path(sys.executable).parent / "bentoml"), "serve", "service.service:Graft"]
# The README's command (the port comes from the environment's PORT; HOST is loopback).
MAKE_SERVE = ["make", "--no-print-directory", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float = 120) -> None:
    """Until `url` answers 200 (a server of the benchmarks starting)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {seconds} s")


@dataclass
class Server:
    base_url: str
    admin_key: str
    data_dir: Path
    process: subprocess.Popen
    log_path: Path

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=300)

    def admin(self) -> httpx.Client:
        return self.client(self.admin_key)

    def new_tenant(self, name: str = "tenant") -> httpx.Client:
        """A client authenticated as a new tenant."""
        with self.admin() as admin:
            response = admin.post("/v1/tenants", json={"name": name})
        assert response.status_code == 201, response.text
        return self.client(response.json()["api_key"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    command: list[str],
    data_dir: Path,
    backbone_dir: Path,
    env: Mapping[str, str | None] | None = None,
    *,
    admin_key: str | None = None,
    port: int | None = None,
    cwd: Path = ROOT,
) -> Server:
    """A server of this checkout (or of the checkout at `cwd`: bench/predict_regression.py),
    once it answers /readyz. `env` adds to this process's environment; a None value
    leaves that variable unset."""
    port = port or free_port()
    admin_key = admin_key or secrets.token_urlsafe(24)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "server.log"
    full_env = {
        **os.environ,
        "GRAFT_DATA_DIR": str(data_dir),
        "GRAFT_BACKBONE_DIR": str(backbone_dir),
        "GRAFT_ADMIN_KEY": admin_key,
        "BENTOML_DO_NOT_TRACK": "True",
        "HF_HUB_OFFLINE": "1",
        "PORT": str(port),
        **(env or {}),
    }
    listen = [] if command == MAKE_SERVE else ["--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*command, *listen],
            cwd=cwd,
            env={name: value for name, value in full_env.items() if value is not None},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", admin_key, data_dir, process, log_path)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}):\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"server not ready in time:\n{server.log()[-4000:]}")


def poll_until_trained(
    client: httpx.Client,
    head_id: str,
    timeout: float = 600,
    progress: list | None = None,
    settled: bool = False,
) -> dict:
    """The head once it is no longer training (after a 202); with `settled`, once no
    version is on its way either (a ready `auto` head comparing fine-tuning shows a
    `progress`). The `progress` it showed meanwhile appended to `progress`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        head = client.get(f"/v1/heads/{head_id}").json()
        if head["status"] != "training" and not (settled and head["progress"]):
            return head
        if progress is not None:
            progress.append(head["progress"])
        time.sleep(0.2)
    raise AssertionError(f"head {head_id} still training after {timeout} s")


def process_tree(pid: int) -> list[psutil.Process]:
    """Process `pid` and every process under it (BentoML's workers, each in a session of
    its own, are still its children)."""
    try:
        top = psutil.Process(pid)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie waiting for its parent to reap it has ended)."""
    running = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


def stop_server(server: Server) -> None:
    workers = process_tree(server.process.pid)[1:]
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        kill_server(server)
    for worker in workers:  # one that outlived its arbiter
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()


def kill_server(server: Server) -> None:
    """A power cut: SIGKILL to the arbiter and every worker at once (BentoML puts each
    worker in a process group of its own, so the arbiter's group is not enough)."""
    for process in process_tree(server.process.pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    server.process.wait()
