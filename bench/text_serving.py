"""Text predict throughput over HTTP, per text backbone, side by side in one run.

    python bench/text_serving.py                      # about 3 minutes on 2 cores
    python bench/text_serving.py --variant int8

Starts one server loading the text backbones (GRAFT_BACKBONES=minilm_l6,mpnet_base_v2),
trains one head per backbone on 8 yelp reviews per label, then for each backbone in turn
(taking turns for `--rounds`) runs `--clients` closed-loop clients for `--duration`
seconds, each sending predicts of `--per-request` yelp sentences (JSON). Prints texts/s,
p50 and p99 latency, and each backbone's ratio to MiniLM's throughput; the median over
rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import YELP, read_texts, text_split
from deploy.local_server import BENTOML, start_server, stop_server
from service.settings import Settings

BACKBONES = ("minilm_l6", "mpnet_base_v2")


def load(server, key: str, head_id: str, texts: list[str], args) -> tuple[float, list[float]]:
    """Texts per second and every request's latency, from `args.clients` threads."""
    latencies: list[float] = []
    done = [0]
    stop = time.monotonic() + args.duration
    lock = threading.Lock()

    def client(offset: int) -> None:
        with server.client(key) as http:
            i = offset
            while time.monotonic() < stop:
                batch = [{"text": texts[(i + j) % len(texts)]} for j in range(args.per_request)]
                i += args.per_request
                start = time.perf_counter()
                answer = http.post(f"/v1/heads/{head_id}/predict", json={"inputs": batch})
                elapsed = time.perf_counter() - start
                assert answer.status_code == 200, answer.text
                with lock:
                    latencies.append(elapsed)
                    done[0] += args.per_request

    threads = [threading.Thread(target=client, args=(k * 97,)) for k in range(args.clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.monotonic() - began), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-request", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", default="fp32")
    args = parser.parse_args()
    rows = read_texts(YELP)
    train, val = text_split(rows, seed=0, train_per_label=8, val_per_label=None)
    texts = [t for _, t in val]
    with tempfile.TemporaryDirectory(prefix="graft-text-serving-") as folder:
        server = start_server(
            BENTOML,
            Path(folder) / "data",
            Settings().backbone_dir,
            {
                "GRAFT_BACKBONES": ",".join(BACKBONES),
                "GRAFT_VARIANT": args.variant,
                "GRAFT_RATE_LIMIT_PER_S": "0",  # one tenant sends it all
            },
        )
        try:
            with server.new_tenant("bench") as tenant:
                key = tenant.headers["Authorization"].removeprefix("Bearer ")
                examples = [{"label": label, "text": text} for label, text in train]
                heads = {}
                for backbone in BACKBONES:
                    created = tenant.post(
                        "/v1/heads",
                        json={"name": backbone, "backbone": backbone, "examples": examples},
                    )
                    assert created.status_code == 201, created.text
                    heads[backbone] = created.json()["id"]
                listed = {b["id"]: b for b in tenant.get("/v1/backbones").json()["backbones"]}
            results: dict[str, list[tuple[float, float, float]]] = {b: [] for b in BACKBONES}
            for _ in range(args.rounds):
                for backbone in BACKBONES:
                    rate, latencies = load(server, key, heads[backbone], texts, args)
                    q = statistics.quantiles(latencies, n=100)
                    results[backbone].append((rate, q[49] * 1000, q[98] * 1000))
        finally:
            stop_server(server)
    print(
        f"# bench/text_serving.py: {args.clients} clients, {args.per_request} text(s) per"
        f" predict, {args.variant}, median of {args.rounds} rounds of {args.duration:.0f} s"
    )
    base = statistics.median(r[0] for r in results[BACKBONES[0]])
    print(
        "| backbone | texts/s | ratio to MiniLM | p50 ms | p99 ms | ms/row at load | MiB at load |"
    )
    print("|---|---|---|---|---|---|---|")
    for backbone, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        p50 = statistics.median(r[1] for r in runs)
        p99 = statistics.median(r[2] for r in runs)
        b = listed[backbone]
        print(
            f"| {backbone} | {rate:.1f} | {rate / base:.2f} | {p50:.0f} | {p99:.0f} |"
            f" {b['ms_per_row']} | {b['memory_bytes'] / 2**20:.0f} |"
        )


if __name__ == "__main__":
    main()
