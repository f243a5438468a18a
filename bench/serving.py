"""Serving many tenants on one backbone: Graft against ONNX Runtime in-process and the peer.

    python bench/serving.py                          # about 5 minutes on 2 cores
    python bench/serving.py --client wrk --body raw  # the load from wrk, raw JPEG bodies
    python bench/serving.py --device cuda --workers 14 --client wrk   # on a GPU machine

Everything runs side by side in this one run, on loopback only, each load bounded in
clients and seconds:
1. In-process ceiling: ONNX Runtime alone on efficientnet_lite0, on the same device,
   preprocessed input, at the batch sizes the service forms.
2. Graft over HTTP: N concurrent clients send predicts of 1 and 8 images spread over 1
   and 1,000 heads (each head has its own tenant and key; heads are written to the
   registry before the server starts). Images/s, p50/p99, the runner's mean batch, and
   where the CPU goes per request: the load client, the API workers, the runner
   (ONNX Runtime and the socket), measured from each process's CPU time. The client is
   aiohttp in this process, or wrk (`--client wrk`: Debian's wrk, a C load generator that
   leaves the cores to the server; `bench/wrk_predict.lua`). Bodies are base64 in JSON
   or raw JPEG bytes (`--body raw`: the body, or multipart files for several).
3. Latency: p99 of single-image predicts at half the saturating load (open loop), and
   the same while a head of 1,000 images trains (another tenant's upload, from a process
   of its own), in rounds: each training against the quiet phase before it; the median.
4. Cold-head latency, creating a head from 100 images and adding 10 examples, and, with
   `--peer-tenants`, the peer (bench/peer_server.py: one complete PyTorch model per
   tenant, loaded on demand into an LRU of M models).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import crops, tree_memory
from bench.load import (
    BACKBONE,
    Requests,
    closed_loop,
    cpu_seconds,
    open_loop,
    own_cpu_seconds,
    p99_ms,
    seed_heads,
    server_roles,
    settle,
    wrk_loop,
)
from deploy.local_server import BENTOML, free_port, start_server, stop_server, wait_until_up
from models.export import ensure_variant
from models.preprocess import decode_image
from models.runtime import Backbone
from service.priority import run_in_idle_time
from service.settings import (
    Settings,
    get_backbone,
    usable_cores,
)


def client_images(n: int = 16) -> list[bytes]:
    """Real photo crops resized client-side to 256 px, as JPEG: what a mobile or web
    client sends."""
    out = []
    for data in crops("china.jpg", n // 2, seed=11) + crops("flower.jpg", n // 2, seed=11):
        image = Image.open(io.BytesIO(data)).resize((256, 256))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def in_process(
    backbone: Backbone, images, batch_sizes, seconds: float, rounds: int = 3, lanes: int = 1
):
    """Images/s of the session alone per batch size: the median of `rounds` timings (this
    machine is shared and noisy). With `lanes`, that many threads run passes side by side,
    as the runner's lanes do."""
    pre = backbone.spec.preprocessing
    rows = np.stack([decode_image(x, pre, 10**8) for x in images])
    rows = np.concatenate([rows] * (1 + max(batch_sizes) // len(rows)))
    timings: dict[int, list[float]] = {size: [] for size in batch_sizes}
    for _ in range(rounds):
        for size in batch_sizes:
            batch = rows[:size]
            backbone.session.run(["embedding"], {"image": batch})  # warm-up
            done = [0] * lanes
            start = time.perf_counter()

            def lane(i: int, batch=batch, done=done, start=start) -> None:
                while time.perf_counter() - start < seconds:
                    backbone.session.run(["embedding"], {"image": batch})
                    done[i] += len(batch)

            threads = [threading.Thread(target=lane, args=(i,)) for i in range(lanes)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            timings[size].append(sum(done) / (time.perf_counter() - start))
    return {size: statistics.median(values) for size, values in timings.items()}


def train_big_head(base: str, key: str, n_images: int, times: multiprocessing.Queue) -> None:
    """Creates a head from `n_images` photo crops (a zip) and waits until it is trained;
    puts the start time on `times`, then the end time and the head's status.

    Run in a process of its own, as another client's upload would come: on a thread of
    the load client's process, its 20 MB upload shared that client's GIL. And at
    SCHED_IDLE: building and sending the upload is the tenant's machine's work, not the
    server's, and at nice 0 it took about 0.3 core-seconds from this 2-core server in the
    second measured (BENCHMARKS.md)."""
    run_in_idle_time()
    half = n_images // 2
    photos = crops("china.jpg", half, seed=31) + crops("flower.jpg", n_images - half, seed=31)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, photo in enumerate(photos):
            archive.writestr(f"{'temple' if i < half else 'flower'}/{i}.jpg", photo)
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, timeout=600, headers=headers) as client:
        times.put(time.perf_counter())  # CLOCK_MONOTONIC: one clock for every process
        created = client.post(
            "/v1/heads",
            data={"name": "big", "backbone": BACKBONE},
            files={"archive": ("big.zip", buffer.getvalue(), "application/zip")},
        )
        assert created.status_code in (201, 202), created.text
        head = created.json()
        while head["status"] == "training":
            time.sleep(0.2)
            head = client.get(f"/v1/heads/{head['id']}").json()
        times.put((time.perf_counter(), head["status"]))


def head_lifecycle(base: str, key: str, backbone: Backbone) -> dict:
    """Create a head from 100 images, then add 10 examples; against the backbone's own time."""
    photos = crops("china.jpg", 50, seed=21) + crops("flower.jpg", 50, seed=21)
    examples = [
        {"label": "temple" if i < 50 else "flower", "image": base64.b64encode(p).decode()}
        for i, p in enumerate(photos)
    ]
    extra = crops("china.jpg", 5, seed=22) + crops("flower.jpg", 5, seed=22)
    extra_examples = [
        {"label": "temple" if i < 5 else "flower", "image": base64.b64encode(p).decode()}
        for i, p in enumerate(extra)
    ]
    pre = backbone.spec.preprocessing
    start = time.perf_counter()
    backbone.embed_images(np.stack([decode_image(p, pre, 10**8) for p in photos]))
    backbone_s = time.perf_counter() - start
    with httpx.Client(base_url=base, timeout=300, headers={"Authorization": f"Bearer {key}"}) as c:
        start = time.perf_counter()
        head = c.post(
            "/v1/heads", json={"name": "h100", "backbone": BACKBONE, "examples": examples}
        )
        create_s = time.perf_counter() - start
        assert head.status_code == 201, head.text
        start = time.perf_counter()
        added = c.post(f"/v1/heads/{head.json()['id']}/examples", json={"examples": extra_examples})
        add_s = time.perf_counter() - start
        assert added.status_code == 200, added.text
    return {"backbone_100_s": backbone_s, "create_100_s": create_s, "add_10_s": add_s}


def cold_head_latency(base: str, targets, image: bytes) -> tuple[float, float]:
    def timed(target) -> float:
        head_id, key = target
        t0 = time.perf_counter()
        response = httpx.post(
            f"{base}/v1/heads/{head_id}/predict",
            json={"inputs": [{"image": base64.b64encode(image).decode()}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        response.raise_for_status()
        return (time.perf_counter() - t0) * 1000

    cold = [timed(t) for t in targets]
    warm = [timed(t) for t in targets]
    return statistics.median(cold), statistics.median(warm)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=15, help="seconds per load phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="turns the phases take")
    parser.add_argument("--per-request", default="1,8", help="images per predict")
    parser.add_argument("--heads", default="1,1000")
    parser.add_argument("--registry", type=int, default=0, help="heads in the registry")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workers", type=int, default=None, help="GRAFT_API_WORKERS")
    parser.add_argument("--client", choices=("aiohttp", "wrk"), default="aiohttp")
    parser.add_argument("--body", choices=("json", "raw"), default="json")
    parser.add_argument("--training-images", type=int, default=1000)
    parser.add_argument("--training-rounds", type=int, default=3, help="heads trained in phase 3")
    parser.add_argument("--peer-tenants", default="", help="e.g. 100,1000")
    parser.add_argument("--peer-models", type=int, default=32, help="the peer's LRU size M")
    args = parser.parse_args()
    head_counts = [int(x) for x in args.heads.split(",")]
    sizes = [int(x) for x in args.per_request.split(",")]
    peer_tenants = [int(x) for x in args.peer_tenants.split(",")] if args.peer_tenants else []
    if args.client == "wrk" and shutil.which("wrk") is None:
        sys.exit("--client wrk needs wrk: apt-get install wrk")
    settings = Settings()
    spec = get_backbone(BACKBONE)
    path = ensure_variant(spec, settings.backbone_dir, settings.variant)
    images = client_images()
    scratch = Path(tempfile.mkdtemp(prefix="graft-serving-"))
    env = {"GRAFT_DEVICE": args.device}
    if args.workers:
        env["GRAFT_API_WORKERS"] = str(args.workers)
    workers = args.workers or settings.api_workers
    print(
        f"# bench/serving.py: {args.clients} clients ({args.client}), {args.body} bodies, "
        f"{args.duration:.0f} s per phase x {args.rounds} rounds, {os.cpu_count()} cores, "
        f"{workers} API workers, {args.device}, {BACKBONE} ({settings.variant})"
    )

    print(f"\n## 1. ONNX Runtime in-process on {args.device}, preprocessed uint8 input")
    batch_sizes = (1, 8, 32) if args.device == "cpu" else (1, 8, 32, 128)
    # On the CPU: the default spinning threads, and without spinning as the service runs.
    # And one single-threaded pass per core side by side, as the runner's lanes run.
    cores = usable_cores()
    configs = {"one pass": (False, 0, 1)}  # (spinning, threads per pass, passes at once)
    if args.device == "cpu":
        configs = {"spinning": (True, 0, 1), "not spinning": (False, 0, 1)}
        configs[f"{cores} lanes"] = (False, 1, cores)
    alone = {
        name: (Backbone(spec, path, device=args.device, allow_spinning=spin, intra_op_threads=t), n)
        for name, (spin, t, n) in configs.items()
    }

    def measure_ceiling(seconds: float, show: bool = False) -> float:
        """The CPU's best at any batch size; on a GPU the issue's reference, batch 32.
        Measured again in every round (this machine's speed drifts by ±15%), each figure
        the median of three timings: the best of nine single timings rode on the noise."""
        best: dict[int, float] = {}
        for name, (backbone, lanes) in alone.items():
            measured = in_process(backbone, images, batch_sizes, seconds, 3, lanes)
            for size, per_s in measured.items():
                best[size] = max(best.get(size, 0.0), per_s)
                if show:
                    print(f"{name:>12}, batch {size:>3}: {per_s:8.1f} images/s")
        return max(best.values()) if args.device == "cpu" else best[32]

    ceilings = [measure_ceiling(1, show=True)]
    decode_ms = timed_decode(images, spec)
    print(f"(decoding and resizing one client image: {decode_ms:.2f} ms of one core)")

    registry = max(args.registry, max(head_counts) + 100)
    heads = seed_heads(scratch / "graft" / "graft.sqlite3", registry, spec.embedding_dim)
    server = start_server(BENTOML, scratch / "graft", settings.backbone_dir, env)
    results: dict[tuple[int, int], list[dict]] = {(s, n): [] for s in sizes for n in head_counts}
    try:
        roles = server_roles(server.process.pid)
        admin = {"Authorization": f"Bearer {server.admin_key}"}
        warm = Requests(server.base_url, heads[:1], images, 1, args.body)
        asyncio.run(closed_loop(warm, args.clients, 3))
        print(f"\n## 2. Graft over HTTP ({registry} heads in the registry, each its own tenant)")
        # The phases take turns, `rounds` times, so drift in this shared machine's speed
        # falls on all of them alike.
        for round_ in range(args.rounds):
            if round_:
                ceilings.append(measure_ceiling(1))
            for size in sizes:
                for n in head_counts:
                    requests = Requests(server.base_url, heads[:n], images, size, args.body)
                    settle(server.base_url, server.admin_key)
                    stats = httpx.get(f"{server.base_url}/v1/stats", headers=admin).json()
                    cpu = {role: cpu_seconds(p) for role, p in roles.items()}
                    cpu["client"] = own_cpu_seconds()
                    seconds = args.duration / args.rounds
                    if args.client == "wrk":
                        r = wrk_loop(requests, args.clients, seconds, scratch)
                    else:
                        r = asyncio.run(closed_loop(requests, args.clients, seconds))
                    r["cpu"] = {role: cpu_seconds(p) - cpu[role] for role, p in roles.items()}
                    r["cpu"]["client"] = own_cpu_seconds() - cpu["client"]
                    after = httpx.get(f"{server.base_url}/v1/stats", headers=admin).json()
                    now, was = after["batchers"][BACKBONE], stats["batchers"][BACKBONE]
                    r["rows"], r["batches"] = (
                        now["rows"] - was["rows"],
                        now["batches"] - was["batches"],
                    )
                    r["cpu"]["passes"] = now["pass_cpu_s"] - was["pass_cpu_s"]
                    r["ratio"] = r["requests"] * size / r["seconds"] / ceilings[-1]
                    results[(size, n)].append(r)
        print(f"{'images/req':>10} {'heads':>6} {'images/s':>9} {'÷ in-proc':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'batch':>6} {'CPU ms/req: client':>19} {'API':>6} {'runner':>7} {'(passes)':>8}")  # fmt: skip
        summary, ratios = {}, {}
        for (size, n), parts in results.items():
            requests = sum(p["requests"] for p in parts)
            per_s = requests * size / sum(p["seconds"] for p in parts)
            cpu = {k: 1000 * sum(p["cpu"][k] for p in parts) / max(1, requests) for k in ("client", "api", "runner", "passes")}  # fmt: skip
            batch = sum(p["rows"] for p in parts) / max(1, sum(p["batches"] for p in parts))
            p50, p99 = (statistics.median(p[k] for p in parts) for k in ("p50_ms", "p99_ms"))
            errors = sum(p["errors"] for p in parts)
            ratio = statistics.median(p["ratio"] for p in parts)
            summary[(size, n)] = per_s
            ratios[(size, n)] = ratio
            print(f"{size:>10} {n:>6} {per_s:9.1f} {ratio:9.2f} {p50:7.1f} {p99:7.1f} {errors:>6} {batch:6.1f} {cpu['client']:19.2f} {cpu['api']:6.2f} {cpu['runner']:7.2f} {cpu['passes']:8.2f}")  # fmt: skip
        print(
            f"(÷ in-proc: each round against that round's in-process figure, {', '.join(f'{c:.1f}' for c in ceilings)} images/s; the median over rounds. p50/p99: medians over rounds, under saturation)"
        )

        print("\n## 3. Latency at half the saturating load (single-image predicts, open loop)")
        single = Requests(server.base_url, heads[: max(head_counts)], images, 1, args.body)
        rate = summary.get((1, max(head_counts)), max(summary.values())) / 2
        # Rounds of (quiet, then while a head of another tenant trains), each training
        # against the quiet phase just before it: one short hiccup of this shared machine
        # moved a single ratio by 2x.
        training_ratios = []
        for round_ in range(args.training_rounds):
            settle(server.base_url, server.admin_key)
            quiet = asyncio.run(open_loop(single, rate, args.duration))
            spawn = multiprocessing.get_context("spawn")
            times = spawn.Queue()
            trainer = spawn.Process(
                target=train_big_head,
                args=(server.base_url, heads[-1 - round_][1], args.training_images, times),
            )
            trainer.start()
            start = times.get(timeout=300)
            busy = asyncio.run(open_loop(single, rate, 3 * args.duration))
            end, status = times.get(timeout=600)
            trainer.join()
            during = [(t, s) for t, s in busy if t < end]
            training_ratios.append(p99_ms(during) / p99_ms(quiet))
            print(f"round {round_ + 1}: quiet p99 {p99_ms(quiet):.1f} ms (p50 {statistics.median(s for _, s in quiet) * 1000:.1f}) at {rate:.0f} req/s; p99 {p99_ms(during):.1f} ms over {len(during)} predicts while a head of {args.training_images} images trained ({end - start:.1f} s, {status}): {training_ratios[-1]:.2f}")  # fmt: skip
        cold, warm_ms = cold_head_latency(server.base_url, heads[-50:], images[0])
        lifecycle = head_lifecycle(server.base_url, heads[-51][1], Backbone(spec, path))
        rss = tree_memory(server.process.pid)[0]
    finally:
        stop_server(server)

    peer: dict[int, dict] = {}
    if peer_tenants:
        print(f"\n## 4. Peer: one PyTorch model per tenant, LRU of {args.peer_models}, over HTTP")
        peer = run_peer(scratch / "peer", peer_tenants, args, images)

    print("\n## Ratios and figures")
    for size in sizes:
        for n in head_counts:
            print(f"{f'{size}-image requests at {n} heads ÷ in-process':<48} {ratios[(size, n)]:6.2f}")  # fmt: skip
    print(f"{'predict p99 while training ÷ without (median)':<48} {statistics.median(training_ratios):6.2f} (rounds: {', '.join(f'{r:.2f}' for r in training_ratios)})")  # fmt: skip
    for t, r in peer.items():
        graft_at = summary.get((1, t), summary[(1, max(head_counts))])
        print(f"{f'Graft ÷ peer at {t} tenants':<48} {graft_at / r['per_s']:6.1f}")
    print(f"{'cold-head latency (p50 of 50)':<48} {cold:6.1f} ms (warm {warm_ms:.1f} ms)")
    print(f"{'create head from 100 images ÷ backbone alone':<48} {lifecycle['create_100_s'] / lifecycle['backbone_100_s']:6.2f} ({lifecycle['create_100_s']:.2f} s)")  # fmt: skip
    print(f"{'add 10 examples to a head of 100':<48} {lifecycle['add_10_s']:6.2f} s")
    print(f"{'server RSS after the run':<48} {rss / 2**20:6.0f} MiB")


def timed_decode(images: list[bytes], spec) -> float:
    start = time.perf_counter()
    for _ in range(5):
        for image in images:
            decode_image(image, spec.preprocessing, 10**8)
    return (time.perf_counter() - start) / (5 * len(images)) * 1000


class PeerRequests(Requests):
    """Single-image JSON predicts for the peer, whose URL names the tenant."""

    def __init__(self, base: str, tenants: int, images: list[bytes]):
        super().__init__(base, [(f"tenant-{i}", "") for i in range(tenants)], images, 1, "json")

    def make(self) -> dict:
        request = super().make()
        tenant = request["url"].split("/v1/heads/")[1].split("/")[0]
        return {"url": f"{self.base}/predict/{tenant}", "json": request["json"]}


def run_peer(scratch: Path, tenant_counts, args, images) -> dict[int, dict]:
    from bench import peer_server

    env = {**os.environ, "PEER_DIR": str(scratch), "PEER_MODELS": str(args.peer_models)}
    os.environ["PEER_DIR"] = str(scratch)
    peer_server.CHECKPOINTS = scratch
    peer_server.write_checkpoints()
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.peer_server:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/stats")
        base_rss = tree_memory(process.pid)[0]

        encoded = base64.b64encode(images[0]).decode()
        for i in range(args.peer_models):  # fill the LRU to measure what M models cost
            httpx.post(
                f"{base}/predict/tenant-{i}", json={"inputs": [{"image": encoded}]}, timeout=120
            )
        loaded = httpx.get(f"{base}/stats").json()["loaded"]
        rss_per_model = (tree_memory(process.pid)[0] - base_rss) / max(1, loaded)
        results = {}
        print(
            f"{'tenants':>7} {'images/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'model loads':>11}"
        )
        for n in tenant_counts:
            before = httpx.get(f"{base}/stats").json()["loads"]
            requests = PeerRequests(base, n, images)
            r = asyncio.run(closed_loop(requests, args.clients, args.duration))
            r["per_s"] = r["requests"] / r["seconds"]
            r["loads"] = httpx.get(f"{base}/stats").json()["loads"] - before
            r["rss_per_model"] = rss_per_model
            results[n] = r
            print(
                f"{n:>7} {r['per_s']:9.1f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} {r['errors']:>6} {r['loads']:>11}"
            )
        print(f"memory: {loaded} models loaded, {rss_per_model / 2**20:.1f} MiB each")
        return results
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
