"""Memory of a server by the backbones it loads (GRAFT_BACKBONES), side by side.

    python bench/backbone_memory.py        # about a minute

Starts a server that loads every built-in backbone, one with the default set, and one
per backbone alone (same settings, 2 API workers), each idle after start, and prints the
memory of each server's process tree (the BentoML arbiter, the API workers, the runner)
and its ratio to the server that loads everything: RSS (what each process has resident,
summed: the pages of shared libraries counted once per process) and PSS (each shared page
divided among the processes that map it: what the tree really holds). Issue 12's target:
lite0 alone ≤ 40% of everything's RSS. The runner's own share per backbone is in
`GET /v1/backbones` (`memory_bytes`) and bench/backbone_accuracy.py.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import tree_memory
from deploy.local_server import BENTOML, start_server, stop_server
from service.settings import (
    Settings,
    list_backbones,
)


def measure(choice: str | None, scratch: Path, backbone_dir: Path) -> tuple[int, int]:
    env = {"GRAFT_API_WORKERS": "2"} | ({"GRAFT_BACKBONES": choice} if choice else {})
    data_dir = Path(tempfile.mkdtemp(dir=scratch))  # short: the runner's socket is inside
    server = start_server(BENTOML, data_dir, backbone_dir, env)
    try:
        time.sleep(5)  # settled after start
        return tree_memory(server.process.pid)
    finally:
        stop_server(server)


def main() -> None:
    backbone_dir = Settings().backbone_dir
    with tempfile.TemporaryDirectory(prefix="graft-backbone-memory-") as folder:
        scratch = Path(folder)
        ids = [spec.id for spec in list_backbones()]
        rss_all, pss_all = measure(",".join(ids), scratch, backbone_dir)
        print("# bench/backbone_memory.py: the server's process tree, idle after start")
        print(f"{'GRAFT_BACKBONES':<24} {'RSS MiB':>8} {'ratio':>6} {'PSS MiB':>8} {'ratio':>6}")

        def row(name: str, rss: int, pss: int) -> None:
            print(
                f"{name:<24} {rss / 2**20:8.0f} {rss / rss_all:6.2f}"
                f" {pss / 2**20:8.0f} {pss / pss_all:6.2f}",
                flush=True,
            )

        row("all built-ins", rss_all, pss_all)
        row("(default set)", *measure(None, scratch, backbone_dir))
        for backbone_id in ids:
            row(backbone_id, *measure(backbone_id, scratch, backbone_dir))


if __name__ == "__main__":
    main()
