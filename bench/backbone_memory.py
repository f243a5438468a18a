"""Memory of a server by the backbones it loads (GRAFT_BACKBONES), side by side.

    python bench/backbone_memory.py        # about a minute

Starts a server that loads every built-in backbone and one per backbone alone (same
settings, 2 API workers), each idle after start, and prints the RSS of each server's
process tree (the BentoML arbiter, the API workers, the runner) and its ratio to the
server that loads everything. Issue 12's target: lite0 alone ≤ 40% of everything.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.serving import tree_rss  # noqa: E402
from models.registry import list_backbones  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.server import BENTOML, start_server, stop_server  # noqa: E402


def measure(choice: str | None, scratch: Path, backbone_dir: Path) -> int:
    env = {"GRAFT_API_WORKERS": "2"} | ({"GRAFT_BACKBONES": choice} if choice else {})
    server = start_server(BENTOML, scratch / (choice or "all"), backbone_dir, env)
    try:
        time.sleep(5)  # settled after start
        return tree_rss(server.process.pid)
    finally:
        stop_server(server)


def main() -> None:
    backbone_dir = Settings().backbone_dir
    with tempfile.TemporaryDirectory(prefix="graft-backbone-memory-") as folder:
        scratch = Path(folder)
        everything = measure(None, scratch, backbone_dir)
        print("# bench/backbone_memory.py: RSS of the server's process tree, idle after start")
        print(f"{'all built-ins':<22} {everything / 2**20:8.0f} MiB  1.00")
        for spec in list_backbones():
            rss = measure(spec.id, scratch, backbone_dir)
            print(f"{spec.id:<22} {rss / 2**20:8.0f} MiB  {rss / everything:.2f}")


if __name__ == "__main__":
    main()
