"""A fleet on one machine: PostgreSQL, Graft replicas and nginx in front, all from
Debian's packages and this checkout, on loopback ports, in a temporary directory.

    make fleet                        # 3 replicas; Ctrl-C stops everything
    python -m deploy.local_fleet --replicas 3 --port 8080

The replicas share the registry (PostgreSQL) and the exported backbones; each has its
own data directory (its runner's socket, rate buckets) and replica id. nginx spreads
requests over them and passes a request the replica could not be reached for to the
next one (a request already sent is never sent twice). The tests drive the same fleet
(`tests/test_e2e_fleet.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.local_postgres import postgres
from deploy.local_server import BENTOML, Server, free_port, kill_server, start_server, stop_server
from service.lifetime import dies_with_this_process
from service.settings import Settings

NGINX_CONF = """
daemon off;
{user}
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    # Graft limits bodies itself, with its own JSON error.
    client_max_body_size 0;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    upstream graft {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://graft;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # A replica that cannot be reached: the next one (POSTs only if not sent yet).
            proxy_next_upstream error timeout;
            proxy_connect_timeout 2s;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


@dataclass
class Fleet:
    url: str  # the balancer's
    admin_key: str
    database_url: str
    replicas: list[Server]
    folder: Path
    backbone_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)

    def kill(self, index: int) -> None:
        """SIGKILL to every process of one replica: a machine lost."""
        kill_server(self.replicas[index])

    def restart(self, index: int) -> None:
        """The replica again, on the same port and data directory (nginx finds it)."""
        old = self.replicas[index]
        self.replicas[index] = _replica(self, index, int(old.base_url.rsplit(":", 1)[1]))


def _replica(fleet: Fleet, index: int, port: int) -> Server:
    env = {
        **fleet.env,
        "GRAFT_DATABASE_URL": fleet.database_url,
        "GRAFT_REPLICA_ID": f"replica-{index}",
    }
    return start_server(
        BENTOML,
        fleet.folder / f"replica-{index}",
        fleet.backbone_dir,
        env,
        admin_key=fleet.admin_key,
        port=port,
    )


def _nginx_config(folder: Path, port: int, upstreams: list[str]) -> Path:
    servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=3s;" for u in upstreams)
    # As root, nginx's workers would switch to an unprivileged user that cannot write here.
    user = "user root;" if os.geteuid() == 0 else ""
    path = folder / "nginx.conf"
    path.write_text(NGINX_CONF.format(folder=folder, port=port, servers=servers, user=user))
    return path


def _nginx_program() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        raise RuntimeError("nginx is not installed: apt-get install nginx")
    return found


@contextlib.contextmanager
def local_fleet(
    replicas: int = 3,
    port: int | None = None,
    backbone_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Fleet]:
    """PostgreSQL, `replicas` Graft servers and nginx in front of them; all stopped and
    removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="graft-fleet-"))
    backbone_dir = backbone_dir or Settings().backbone_dir
    nginx = None
    try:
        with postgres() as database_url:
            fleet = Fleet(
                url="",
                admin_key=secrets.token_urlsafe(24),
                database_url=database_url,
                replicas=[],
                folder=folder,
                backbone_dir=backbone_dir,
                # One API worker each: three replicas share this machine's cores.
                env={"GRAFT_API_WORKERS": "1", **(env or {})},
            )
            ports = [free_port() for _ in range(replicas)]
            try:
                # The first replica migrates the new database alone; the others then start
                # side by side.
                fleet.replicas.append(_replica(fleet, 0, ports[0]))
                with ThreadPoolExecutor(replicas) as pool:
                    fleet.replicas += list(
                        pool.map(lambda i: _replica(fleet, i, ports[i]), range(1, replicas))
                    )
                balancer_port = port or free_port()
                upstreams = [s.base_url.removeprefix("http://") for s in fleet.replicas]
                config = _nginx_config(folder, balancer_port, upstreams)
                nginx = subprocess.Popen(
                    [_nginx_program(), "-c", str(config), "-p", str(folder)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                    # Stopped with this process however it ends (the replicas end with it
                    # too: service/lifetime.py); PostgreSQL, a daemon, does not.
                    preexec_fn=dies_with_this_process(),
                )
                fleet.url = f"http://127.0.0.1:{balancer_port}"
                _wait_for(f"{fleet.url}/readyz", nginx)
                yield fleet
            finally:
                if nginx is not None:
                    nginx.send_signal(signal.SIGQUIT)  # graceful
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        nginx.wait(timeout=10)
                    if nginx.poll() is None:
                        nginx.kill()
                for server in fleet.replicas:
                    stop_server(server)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for(url: str, nginx: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if nginx.poll() is not None:
            raise RuntimeError(f"nginx exited ({nginx.returncode})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {seconds} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--port", type=int, default=8080, help="the balancer's port")
    args = parser.parse_args()
    # The user's setting (or its default), not the test servers' longer wait.
    wait = {"GRAFT_SYNC_TRAINING_TIMEOUT_S": str(Settings().sync_training_timeout_s)}
    with local_fleet(args.replicas, args.port, env=wait) as fleet:
        print(
            f"graft fleet: {fleet.url} (nginx) in front of",
            ", ".join(s.base_url for s in fleet.replicas),
        )
        print(f"registry: {fleet.database_url}; state under {fleet.folder}")
        print(f"admin key: {fleet.admin_key}")
        print("Ctrl-C stops the fleet and removes its state")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
