"""Predict throughput of one replica on PostgreSQL against one on SQLite, side by side.

    python bench/database_serving.py            # about 4 minutes on 2 cores

Two servers with the same settings, one on a SQLite file, one on PostgreSQL 15 (Debian's,
on loopback, `tests/postgres.py`), each with the same 1,100 heads of 1,100 tenants.
They take turns under the same load: wrk (or aiohttp without it), 16 connections of
single-image raw-JPEG predicts over 1,000 heads, as bench/serving.py's phase 2. The
server not measured is idle. Issue 11's target: PostgreSQL within 10% of SQLite.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.load import BACKBONE, report_turns, seed_heads, take_turns
from bench.serving import client_images
from deploy.local_postgres import postgres
from deploy.local_server import BENTOML, start_server, stop_server
from service.settings import (
    Settings,
    get_backbone,
)

HEADS = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    settings = Settings()
    dim = get_backbone(BACKBONE).embedding_dim
    images = client_images()
    scratch = Path(tempfile.mkdtemp(prefix="graft-database-serving-"))
    use_wrk = shutil.which("wrk") is not None
    print(
        f"# bench/database_serving.py: {args.clients} clients ({'wrk' if use_wrk else 'httpx'}),"
        f" raw single-image predicts over {HEADS} heads, {args.duration:.0f} s x {args.rounds}"
        f" rounds per engine, {settings.api_workers} API workers"
    )
    servers = {}
    with postgres() as url:
        try:
            for engine, database in (
                ("SQLite", scratch / "SQLite" / "graft.sqlite3"),  # the server's default
                ("PostgreSQL", url),
            ):
                heads = seed_heads(database, HEADS + 100, dim)
                env = {} if engine == "SQLite" else {"GRAFT_DATABASE_URL": url}
                server = start_server(BENTOML, scratch / engine, settings.backbone_dir, env)
                servers[engine] = (server, heads[:HEADS])
            rates = take_turns(
                servers, images, rounds=args.rounds, duration=args.duration,
                clients=args.clients, scratch=scratch,
            )  # fmt: skip
        finally:
            for server, _ in servers.values():
                stop_server(server)
    shutil.rmtree(scratch, ignore_errors=True)
    report_turns(rates, "PostgreSQL", "SQLite", " (target ≥ 0.90)")


if __name__ == "__main__":
    main()
