"""A server's memory idle and after it has created heads: training state must not outlive
its job (issue 27's target: after 5 MPNet heads, at most 1.2 times idle).

    python bench/training_memory.py --base 41a2f53    # about 15 minutes on 2 cores

A server on the default backbones (MPNet included) starts on a fresh SQLite file; once
ready and quiet, the memory of all its processes is read (RSS, and USS: the memory no
other process shares); then 5 MPNet text heads of 16 yelp sentences each are created
with the defaults (fine_tune: auto), one after the other, and the memory is read after
each. With --base, an earlier revision (a scratch git worktree, the same venv) is
measured the same way first.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import YELP, read_texts
from deploy.local_server import (
    BENTOML,
    alive,
    poll_until_trained,
    process_tree,
    start_server,
    stop_server,
)
from models import cpu
from service.settings import Settings

MIB = 2**20


def memory(server) -> tuple[float, float, int]:
    """RSS and USS of every process of the server, in MiB, and how many there are."""
    rss = uss = 0
    processes = alive(process_tree(server.process.pid))
    for process in processes:
        with contextlib.suppress(psutil.Error):  # one that ended since
            info = process.memory_full_info()
            rss, uss = rss + info.rss, uss + info.uss
    return rss / MIB, uss / MIB, len(processes)


def settle(seconds: float = 10) -> None:
    time.sleep(seconds)  # the last request's buffers freed, the head caches quiet


def measure(label: str, cwd: Path, heads: int, per_label: int, scratch: Path) -> list[tuple]:
    rows = read_texts(YELP)
    rng = random.Random(0)
    server = start_server(BENTOML, scratch / label, Settings().backbone_dir, cwd=cwd)
    table = []
    try:
        settle()
        table.append(("idle", *memory(server), None))
        with server.new_tenant("memory") as client:
            for i in range(heads):
                examples = [
                    {"label": label_, "text": text}
                    for label_ in ("0", "1")
                    for text in rng.sample([t for lab, t in rows if lab == label_], per_label)
                ]
                started = time.perf_counter()
                answer = client.post(
                    "/v1/heads",
                    json={"name": f"h{i}", "backbone": "mpnet_base_v2", "examples": examples},
                )
                assert answer.status_code in (201, 202), answer.text
                head = poll_until_trained(client, answer.json()["id"], timeout=3600)
                seconds = time.perf_counter() - started
                assert head["status"] == "ready", head
                chosen = head["metrics"]["fine_tuning"]["chosen"]
                settle()
                table.append((f"after head {i + 1} ({chosen})", *memory(server), seconds))
    finally:
        stop_server(server)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="an earlier git revision to measure first")
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--per-label", type=int, default=8)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="graft-training-memory-"))
    trees = []
    if args.base:
        base = scratch / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base],
            check=True,
        )
        trees.append((args.base, base))
    trees.append(("this checkout", ROOT))
    print(f"# bench/training_memory.py on {cpu.describe()}, {psutil.cpu_count()} cores")
    try:
        for label, tree in trees:
            table = measure(label.replace(" ", "-"), tree, args.heads, args.per_label, scratch)
            idle_rss, idle_uss = table[0][1], table[0][2]
            print(f"\n{label}")
            print(
                f"{'':28} {'RSS MiB':>9} {'USS MiB':>9} {'÷ idle (RSS)':>13} {'processes':>9} {'create s':>9}"
            )
            for name, rss, uss, n, seconds in table:
                took = "" if seconds is None else f"{seconds:9.1f}"
                print(f"{name:28} {rss:9.0f} {uss:9.0f} {rss / idle_rss:13.2f} {n:9d} {took}")
            print(
                f"final ÷ idle: RSS {table[-1][1] / idle_rss:.2f}, USS {table[-1][2] / idle_uss:.2f}"
            )
    finally:
        if args.base:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)])


if __name__ == "__main__":
    main()
