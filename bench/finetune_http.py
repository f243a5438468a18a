"""Serving fine-tuned heads over HTTP at 1,000 heads (issue 13: throughput with 10%
of the heads fine-tuned ≥ 0.7 of all frozen; ≤ 1 MB per fine-tuned head).

    python bench/finetune_http.py                              # MiniLM
    python bench/finetune_http.py --backbone mpnet_base_v2
    python bench/finetune_http.py --backbone efficientnet_lite0 --create 300

One server (GRAFT_BACKBONES=--backbone) over a registry seeded with two sets of `--heads`
heads, each head its own tenant: `frozen`, all frozen; `mixed`, `--tuned-share` of them
fine-tuned (random LoRA factors of rank 8, stored as training stores them). Closed-loop
clients send predicts of `--per-request` UCI sentences (flowers photos, as JSON, for an
image backbone) to random heads of one set; the
sets take turns for `--rounds` and each prints its median. Then a second server with
GRAFT_FINE_TUNING=false (whole graphs, the backbone unsplit) serves the frozen set: what
serving through a trunk and a top costs frozen heads. Memory: the head caches' bytes
(GET /v1/stats) and the processes' RSS, after each set has been served. First, the time
to create a head with `fine_tune: on` from `--create` yelp reviews (half per label), on
the idle server: the request until the head is ready, and what its report says, beside
the same head created with `fine_tune: off` (images:
`--create` flowers training photos, a fifth per label).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import FLOWERS, YELP, image_split, read_texts
from bench.load import Requests, closed_loop, seed_heads, server_roles
from deploy.local_server import BENTOML, poll_until_trained, start_server, stop_server
from models.export import ensure_split
from service.settings import Settings


class TextRequests:
    """Predicts of `per_request` sentences for random heads of `targets`."""

    def __init__(self, base: str, targets, texts: list[str], per_request: int) -> None:
        self.base, self.targets, self.texts, self.per_request = base, targets, texts, per_request

    def make(self) -> dict:
        head_id, key = random.choice(self.targets)
        picks = random.sample(self.texts, self.per_request)
        return {
            "url": f"{self.base}/v1/heads/{head_id}/predict",
            "headers": {"Authorization": f"Bearer {key}"},
            "json": {"inputs": [{"text": t} for t in picks]},
        }


def random_factors(top_path: Path, seed: int) -> list[np.ndarray]:
    """A head's LoRA factors in the top graph's input shapes: what compute sees."""
    rng = np.random.default_rng(seed)
    inputs = ort.InferenceSession(str(top_path), providers=["CPUExecutionProvider"]).get_inputs()
    return [
        (rng.standard_normal(i.shape) * 0.02).astype(np.float16)
        for i in inputs
        if i.name.startswith("lora_")
    ]


def memory(server) -> dict:
    import httpx

    stats = httpx.get(
        f"{server.base_url}/v1/stats", headers={"Authorization": f"Bearer {server.admin_key}"}
    ).json()
    roles = server_roles(server.process.pid)
    return {
        "cache_bytes": stats["head_cache"]["bytes"],
        "cache_heads": stats["head_cache"]["heads"],
        "api_rss": sum(p.memory_info().rss for p in roles["api"]),
        "runner_rss": sum(p.memory_info().rss for p in roles["runner"]),
    }


def measure(server, sets: dict, queries: list, args) -> dict[str, float]:
    """Inputs/s per set: the median over rounds, the sets taking turns. `queries`: texts,
    or image bytes."""
    rates: dict[str, list[float]] = {name: [] for name in sets}
    for _ in range(args.rounds):
        for name, targets in sets.items():
            if isinstance(queries[0], bytes):
                requests = Requests(server.base_url, targets, queries, args.per_request, "json")
            else:
                requests = TextRequests(server.base_url, targets, queries, args.per_request)
            result = asyncio.run(closed_loop(requests, args.clients, args.duration))
            assert result["errors"] == 0, result
            rate = result["requests"] * args.per_request / result["seconds"]
            rates[name].append(rate)
            print(
                f"  {name:>7}: {rate:6.1f} inputs/s  p50 {result['p50_ms']:6.1f} ms"
                f"  p99 {result['p99_ms']:6.1f} ms",
                flush=True,
            )
    return {name: statistics.median(values) for name, values in rates.items()}


def creation_times(server, backbone: str, rows: list[tuple[str, object]], sizes: list[int]):
    """Table rows: seconds from the create request until the head is ready, per size.
    `rows`: (label, text or image path); an equal share per label."""
    import base64
    import time

    labels = sorted({label for label, _ in rows})
    out = []
    for size in sizes:
        examples = [
            {"label": label, "text": x}
            if isinstance(x, str)
            else {"label": label, "image": base64.b64encode(x.read_bytes()).decode()}
            for label in labels
            for x in [x for lab, x in rows if lab == label][: size // len(labels)]
        ]
        body = {"name": f"n{size}", "backbone": backbone, "examples": examples}
        seconds = {}
        for mode in ("off", "on"):
            # A tenant each: the other's embeddings, cached per tenant, would be reused.
            with server.new_tenant(f"creation-{size}-{mode}") as client:
                started = time.perf_counter()
                answer = client.post("/v1/heads", json={**body, "fine_tune": mode}, timeout=900)
                head = poll_until_trained(client, answer.json()["id"], timeout=900)
                seconds[mode] = time.perf_counter() - started
        report = head["metrics"]["fine_tuning"]
        candidates = " / ".join(
            f"{c['cv_accuracy']:.2f}" for c in (report.get("candidates") or {}).values()
        )
        out.append(
            f"| {size} | {seconds['on']:.1f} | {report.get('seconds')} | {candidates} |"
            f" {seconds['off']:.1f} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="minilm_l6")
    parser.add_argument("--heads", type=int, default=1000, help="heads per set")
    parser.add_argument("--tuned-share", type=float, default=0.1)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-request", type=int, default=1)
    parser.add_argument("--duration", type=float, default=20, help="seconds per load phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--create", default="16,100", help="examples of the heads created")
    args = parser.parse_args()
    settings = Settings()
    spec = settings.catalog[args.backbone]
    split = ensure_split(spec, settings.backbone_dir)
    assert split is not None, f"{spec.id} cannot be fine-tuned"
    if spec.modality == "image":
        rows = image_split(FLOWERS / "train")
        queries = [path.read_bytes() for _, path in image_split(FLOWERS / "val")[::10]]
    else:
        rows = read_texts(YELP)
        queries = [text for _, text in rows]
    scratch = Path(tempfile.mkdtemp(prefix="graft-finetune-http-"))
    database = scratch / "graft" / "graft.sqlite3"
    database.parent.mkdir(parents=True)
    tuned = int(args.heads * args.tuned_share)
    frozen = seed_heads(database, args.heads, spec.embedding_dim, backbone=spec.id)
    mixed = seed_heads(
        database,
        args.heads,
        spec.embedding_dim,
        backbone=spec.id,
        top_factors=lambda i: random_factors(split[1], i) if i < tuned else None,
    )
    sets = {"frozen": frozen, "mixed": mixed}
    env = {"GRAFT_BACKBONES": spec.id}
    print(
        f"# {spec.id}: {args.heads} heads per set, {tuned} of the mixed set fine-tuned;"
        f" {args.clients} clients, {args.per_request} input(s) per request"
    )
    server = start_server(BENTOML, scratch / "graft", settings.backbone_dir, env)
    try:
        created = creation_times(
            server, spec.id, rows, [int(n) for n in args.create.split(",") if n]
        )
        measure(
            server, {"frozen": frozen}, queries, argparse.Namespace(**{**vars(args), "rounds": 1})
        )
        rates = measure(server, sets, queries, args)
        used = memory(server)
    finally:
        stop_server(server)
    server = start_server(
        BENTOML, scratch / "graft", settings.backbone_dir, {**env, "GRAFT_FINE_TUNING": "false"}
    )
    try:
        measure(
            server, {"frozen": frozen}, queries, argparse.Namespace(**{**vars(args), "rounds": 1})
        )
        whole = measure(server, {"whole": frozen}, queries, args)["whole"]
    finally:
        stop_server(server)
    factor_bytes = sum(f.nbytes for f in random_factors(split[1], 0))
    print(f"\n| measure ({spec.id}) | value |\n|---|---|")
    print(f"| inputs/s, all frozen (split) | {rates['frozen']:.1f} |")
    print(f"| inputs/s, {args.tuned_share:.0%} fine-tuned | {rates['mixed']:.1f} |")
    print(f"| **{args.tuned_share:.0%} fine-tuned ÷ all frozen** | **{rates['mixed'] / rates['frozen']:.2f}** |")  # fmt: skip
    print(f"| inputs/s, all frozen, whole graph (GRAFT_FINE_TUNING=false) | {whole:.1f} |")
    print(f"| split ÷ whole graph, all frozen | {rates['frozen'] / whole:.2f} |")
    print(f"| factors per fine-tuned head (fp16) | {factor_bytes / 2**20:.2f} MiB |")
    print(f"| head caches after both sets | {used['cache_bytes'] / 2**20:.1f} MiB for {used['cache_heads']} heads |")  # fmt: skip
    print(f"| RSS: API workers / runner | {used['api_rss'] / 2**20:.0f} / {used['runner_rss'] / 2**20:.0f} MiB |")  # fmt: skip
    print(
        "\n| examples | seconds to ready | report's seconds | held-out frozen / fine-tuned"
        " | seconds to ready, `off` |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(created))


if __name__ == "__main__":
    main()
