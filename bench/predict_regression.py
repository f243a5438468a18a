"""Predict throughput of this checkout against an earlier revision, side by side.

    python bench/predict_regression.py --base 3c644f7    # about 4 minutes on 2 cores

The base revision is checked out in a scratch git worktree; both servers run from the
same virtual environment, each on its own SQLite file seeded with the same 1,100 heads
of 1,100 tenants. They take turns under the same load: wrk (or aiohttp without it), 16
connections of single-image raw-JPEG predicts over 1,000 heads, as
bench/database_serving.py. The server not measured is idle. Issue 14's target: the
console and the training progress add nothing to the predict path (ratio ≈ 1).

    python bench/predict_regression.py --base 5d22c82 --depths 2

With `--depths K`, this checkout's heads all read the deepest K depths of the pass beside
the embedding (issue 29's target: throughput ÷ heads on the embedding alone ≥ 0.95).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.load import BACKBONE, report_turns, take_turns
from bench.serving import client_images
from deploy.local_server import BENTOML, start_server, stop_server
from models.export import ensure_onnx
from models.runtime import Backbone
from service.settings import (
    Settings,
    get_backbone,
)

HEADS = 1000


def seed_in(
    tree: Path, database: Path, n: int, dim: int, depths: int = 0, depth_columns: int = 0
) -> list[tuple[str, str]]:
    """`seed_heads` as the code of `tree` writes them: each revision's schema is its own
    (a later migration would stop the earlier server from opening the file)."""
    reading = f", depths={depths}, depth_columns={depth_columns}" if depths else ""
    # bench.serving: where every revision has it (later ones import it from bench.load).
    code = (
        "import json, sys; sys.path.insert(0, '.'); from bench.serving import seed_heads;"
        " print(json.dumps(seed_heads(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])"
        f"{reading})))"
    )
    database.parent.mkdir(parents=True, exist_ok=True)
    seeded = subprocess.run(
        [sys.executable, "-c", code, f"sqlite:///{database}", str(n), str(dim)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return [tuple(h) for h in json.loads(seeded.stdout.splitlines()[-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare with")
    parser.add_argument("--duration", type=float, default=20, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--depths", type=int, default=0, help="this checkout's heads read these")
    args = parser.parse_args()
    settings = Settings()
    spec = get_backbone(BACKBONE)
    dim = spec.embedding_dim
    widths = Backbone(spec, ensure_onnx(spec, settings.backbone_dir)).depth_widths
    depth_columns = sum(widths[len(widths) - args.depths :]) if args.depths else 0
    images = client_images()
    scratch = Path(tempfile.mkdtemp(prefix="graft-predict-regression-"))
    base_tree = scratch / "base"
    git = ["git", "-C", str(ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", str(base_tree), args.base], check=True)
    use_wrk = shutil.which("wrk") is not None
    head_rev = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    print(
        f"# bench/predict_regression.py: {head_rev.stdout.strip()} (this checkout) against"
        f" {args.base}; {args.clients} clients ({'wrk' if use_wrk else 'httpx'}), raw"
        f" single-image predicts over {HEADS} heads, {args.duration:.0f} s x {args.rounds}"
        f" rounds each, {settings.api_workers} API workers; this checkout's heads read"
        f" {args.depths} depths ({depth_columns} columns) beside the embedding"
    )
    servers = {}
    try:
        for name, tree in (("base", base_tree), ("this", ROOT)):
            data = scratch / f"data-{name}"  # graft.sqlite3: the server's default file there
            reading = (args.depths, depth_columns) if name == "this" else (0, 0)
            heads = seed_in(tree, data / "graft.sqlite3", HEADS + 100, dim, *reading)
            server = start_server(BENTOML, data, settings.backbone_dir, cwd=tree)
            servers[name] = (server, heads[:HEADS])
        # Each server runs its own tree's code: only this checkout serves the console at /.
        consoles = {
            name: "content-security-policy" in httpx.get(f"{server.base_url}/").headers
            for name, (server, _) in servers.items()
        }
        print(f"# console at /: {consoles}")
        rates = take_turns(
            servers, images, rounds=args.rounds, duration=args.duration, clients=args.clients,
            scratch=scratch,
        )  # fmt: skip
    finally:
        for server, _ in servers.values():
            stop_server(server)
        subprocess.run([*git, "worktree", "remove", "--force", str(base_tree)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    report_turns(rates, "this", "base")


if __name__ == "__main__":
    main()
