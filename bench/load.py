"""Load on a Graft server, for the benchmarks: heads seeded in its registry, predict
requests, the clients that send them (closed and open loops, from this process, from
several client processes, or from wrk), and what a load cost: each role's CPU (the API
workers, the runner, the clients), the runner's batches, the GPU's utilisation.

The clients are aiohttp, not httpx: 0.11-0.17 ms of the client's CPU per request against
httpx's 2.9-3.1 ms (`bench/client_cost.py`; BENCHMARKS.md, issue 31). A benchmark's
clients share the cores with the server they load; what they spend, it does not get.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import multiprocessing
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import psutil
import sqlalchemy as sa
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.store import Store

BACKBONE = "efficientnet_lite0"


def seed_heads(
    database: str | Path,
    n: int,
    dim: int,
    *,
    backbone: str = BACKBONE,
    top_factors: Callable[[int], list[np.ndarray] | None] = lambda i: None,
    depths: int = 0,
    depth_columns: int = 0,
) -> list[tuple[str, str]]:
    """n two-label heads, each of its own tenant, written straight to the registry (a URL,
    or the path of a SQLite file); head i fine-tuned with `top_factors(i)`, if any; each
    reading the deepest `depths` depths (`depth_columns` wide) beside the embedding."""
    store = Store(database)
    if store.engine.dialect.name == "sqlite":
        # Seeding only, not what is measured: no fsync per head (new connections, OFF last).
        listen = sa.event.listen
        listen(store.engine, "connect", lambda db, _: db.execute("PRAGMA synchronous=OFF"))
        store.engine.dispose()
    rng = np.random.default_rng(0)
    heads = []
    for i in tqdm(range(n), desc="seeding the registry", mininterval=5, file=sys.stderr):
        tenant, key = store.create_tenant(name=f"tenant-{i}")
        head = store.create_head(tenant_id=tenant.id, name=f"head-{i}", backbone=backbone)
        store.save_version(
            tenant_id=tenant.id, head_id=head.id, backbone=backbone, new_embeddings={},
            examples=[], labels=["a", "b"],
            weights=rng.normal(size=(dim + depth_columns, 2)).astype(np.float32),
            bias=np.zeros(2, np.float32),
            prototypes=rng.normal(size=(dim, 2)).astype(np.float32), unknown_threshold=0.0,
            metrics={"n_examples": 0}, top_factors=top_factors(i), depths=depths,
        )  # fmt: skip
        heads.append((head.id, key))
    store.close()
    return heads


class Requests:
    """Predict requests of `per_request` images (or `kind="audio"`: WAV clips) for random
    targets, as JSON or raw."""

    MEDIA = {"image": "image/jpeg", "audio": "audio/wav"}

    def __init__(
        self,
        base: str,
        targets,
        images: list[bytes],
        per_request: int,
        body: str,
        kind: str = "image",
    ):
        self.base, self.targets, self.images = base, targets, images
        self.encoded = [base64.b64encode(x).decode() for x in images]
        self.per_request, self.body, self.kind = per_request, body, kind

    def make(self) -> dict:
        head_id, key = random.choice(self.targets)
        request = {
            "url": f"{self.base}/v1/heads/{head_id}/predict",
            "headers": {"Authorization": f"Bearer {key}"},
        }
        picks = random.choices(range(len(self.images)), k=self.per_request)
        media = self.MEDIA[self.kind]
        if self.body == "json":
            request["json"] = {"inputs": [{self.kind: self.encoded[i]} for i in picks]}
        elif self.per_request == 1:
            request["content"] = self.images[picks[0]]
            request["headers"]["Content-Type"] = media
        else:
            request["files"] = [(self.kind, (f"{i}", self.images[i], media)) for i in picks]
        return request


def load_client(connections: int) -> aiohttp.ClientSession:
    """The load generators' HTTP client (aiohttp: the module says why)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=120),
    )


async def post(session: aiohttp.ClientSession, request: dict) -> int:
    """Sends a request of `Requests.make()` and reads its answer whole: the status."""
    data = request.get("content")
    if "files" in request:
        data = aiohttp.FormData()
        for field, (name, body, media) in request["files"]:
            data.add_field(field, body, filename=name, content_type=media)
    async with session.post(
        request["url"], headers=request.get("headers"), json=request.get("json"), data=data
    ) as response:
        await response.read()
        return response.status


async def closed_loop(requests: Requests, clients: int, seconds: float) -> dict:
    """`clients` concurrent connections, each sending predicts back to back."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def one_client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            if await post(session, requests.make()) == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    async with load_client(clients) as session:
        start = time.perf_counter()
        await asyncio.gather(*(one_client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies), "seconds": elapsed, "errors": errors,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "latencies_ms": ms,  # each answered request's, for percentiles over several loops
    }  # fmt: skip


async def open_loop(requests: Requests, rate: float, seconds: float) -> list[tuple[float, float]]:
    """Requests started at a fixed rate, whatever the answers: (start, seconds) of each
    answered one (an error counts as an infinite latency)."""
    answered: list[tuple[float, float]] = []

    async def one(session: aiohttp.ClientSession) -> None:
        t0 = time.perf_counter()
        ok = await post(session, requests.make()) == 200
        answered.append((t0, time.perf_counter() - t0 if ok else float("inf")))

    async with load_client(256) as session:
        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session)))
        await asyncio.gather(*tasks)
    return answered


def p99_ms(answered: list[tuple[float, float]]) -> float:
    return float(np.percentile([s for _, s in answered], 99) * 1000) if answered else float("nan")


def wrk_loop(requests: Requests, clients: int, seconds: float, scratch: Path) -> dict:
    """The same load from wrk (one thread, `clients` connections), in a process of its own."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    (folder / "targets.txt").write_text("".join(f"{h} {k}\n" for h, k in requests.targets))
    for i, (data, encoded) in enumerate(zip(requests.images, requests.encoded, strict=True)):
        (folder / f"input{i}.bin").write_bytes(data)
        (folder / f"input{i}.b64").write_text(encoded)
    done = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{seconds:.0f}s", "--timeout", "60s",
         "-s", str(ROOT / "bench" / "wrk_predict.lua"), requests.base, "--",
         str(folder), str(requests.per_request), requests.body, requests.kind,
         requests.MEDIA[requests.kind]],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["requests"] -= result["errors"]
    return result


def take_turns(
    servers: dict[str, tuple],
    images: list[bytes],
    *,
    rounds: int,
    duration: float,
    clients: int,
    scratch: Path,
) -> dict[str, list[float]]:
    """Servers (name: (server, heads)) measured in turn under the same load: wrk, or aiohttp
    without it, `clients` connections of single-image raw-JPEG predicts over the server's
    heads, while the others idle. Round 0 warms each up. Images/s per round, by name."""
    use_wrk = shutil.which("wrk") is not None
    rates: dict[str, list[float]] = {name: [] for name in servers}
    for round_ in range(rounds + 1):
        for name, (server, heads) in servers.items():
            requests = Requests(server.base_url, heads, images, 1, "raw")
            settle(server.base_url, server.admin_key)
            seconds = duration if round_ else 5
            if use_wrk:
                r = wrk_loop(requests, clients, seconds, scratch)
            else:
                r = asyncio.run(closed_loop(requests, clients, seconds))
            if round_:
                rates[name].append(r["requests"] / r["seconds"])
                print(f"round {round_} {name:<10} {rates[name][-1]:7.1f} images/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}")  # fmt: skip
    return rates


def report_turns(rates: dict[str, list[float]], new: str, old: str, target: str = "") -> None:
    """Each server's median, and `new` ÷ `old` round by round (both ran the same round)."""
    ratios = [a / b for a, b in zip(rates[new], rates[old], strict=True)]
    for name, values in rates.items():
        print(f"{name:<10} median {statistics.median(values):7.1f} images/s")
    print(
        f"{new} ÷ {old}, round by round: {', '.join(f'{x:.3f}' for x in ratios)};"
        f" median {statistics.median(ratios):.3f}{target}"
    )


def server_roles(pid: int) -> dict[str, list[psutil.Process]]:
    """The server's processes: the backbone runner, and the rest (API workers, arbiter)."""
    roles: dict[str, list[psutil.Process]] = {"api": [], "runner": []}
    arbiter = psutil.Process(pid)
    for process in [arbiter, *arbiter.children(recursive=True)]:
        runner = "graft-runner" in " ".join(process.cmdline())
        roles["runner" if runner else "api"].append(process)
    return roles


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def own_cpu_seconds() -> float:
    """This process and its finished children (wrk, once it has exited)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def settle(base: str, admin_key: str) -> None:
    """Waits until the runner has drained what the last phase left queued (a closed-loop
    client stops with a full queue): until no row goes through for half a second."""
    headers = {"Authorization": f"Bearer {admin_key}"}

    def rows() -> int:
        stats = httpx.get(f"{base}/v1/stats", headers=headers, timeout=60).json()
        return sum(b["rows"] for b in stats["batchers"].values())

    before = rows()
    while True:
        time.sleep(0.5)
        now = rows()
        if now == before:
            return
        before = now


def _client_process(args: tuple) -> tuple[dict, float, tuple[float, float]]:
    """One client process's `closed_loop`, its CPU seconds, and when it ran (wall clock)."""
    base, targets, images, per_request, connections, seconds, seed = args
    random.seed(seed)
    cpu, began = time.process_time(), time.time()
    requests = Requests(base, targets, images, per_request, "raw")
    figures = asyncio.run(closed_loop(requests, connections, seconds))
    return figures, time.process_time() - cpu, (began, time.time())


def spread_closed_loop(base, targets, images, per_request, processes, connections, seconds) -> dict:
    """Images/s, p50 and p99 from `processes` client processes of `connections` each."""
    jobs = [
        (base, targets, images, per_request, connections, seconds, seed)
        for seed in range(processes)
    ]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_client_process, jobs)
    answered = sum(r["requests"] for r, _, _ in results)
    elapsed = max(r["seconds"] for r, _, _ in results)
    latencies = np.concatenate([r["latencies_ms"] for r, _, _ in results])
    return {
        "images": per_request * answered,
        "images_per_s": per_request * answered / elapsed,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
        "errors": sum(r["errors"] for r, _, _ in results),
        "client_cpu_s": sum(cpu for _, cpu, _ in results),
        "window": _spanning([ran for _, _, ran in results]),
    }


def _spanning(windows: list[tuple[float, float]]) -> tuple[float, float]:
    """The wall-clock span of the client processes' loops (not their start-up)."""
    return min(began for began, _ in windows), max(ended for _, ended in windows)


def _open_loop_process(args: tuple) -> tuple[list, float, tuple[float, float]]:
    """One client process's share of an open loop: (start, seconds) of each answer, its
    CPU seconds, and when it ran (wall clock)."""
    base, targets, images, rate, seconds, seed = args
    random.seed(seed)
    cpu, began = time.process_time(), time.time()
    answered = asyncio.run(open_loop(Requests(base, targets, images, 1, "raw"), rate, seconds))
    return answered, time.process_time() - cpu, (began, time.time())


def spread_open_loop(base, targets, images, rate, processes, seconds) -> dict:
    """Single raw JPEGs at `rate` per second in all, whatever the answers, started by
    `processes` client processes (one Python process alone could not start thousands a
    second on time, and its own lateness would count as latency)."""
    jobs = [(base, targets, images, rate / processes, seconds, seed) for seed in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_open_loop_process, jobs)
    answered = [a for r in results for a in r[0]]
    return {
        "rate": rate,
        "images": len(answered),
        "p50_ms": statistics.median(s * 1000 for _, s in answered),
        "p99_ms": p99_ms(answered),
        "errors": sum(1 for _, seconds in answered if seconds == float("inf")),
        "client_cpu_s": sum(cpu for _, cpu, _ in results),
        "window": _spanning([ran for _, _, ran in results]),
    }


def under_load(server, load) -> dict:
    """`load()`'s figures (it gives `images`, `client_cpu_s` and the `window` its loops ran
    in), with what the load cost: the CPU cores the API workers, the runner and the
    clients kept busy over that window and their CPU milliseconds per image, the runner's
    mean batch, and the GPU's mean utilisation over the window."""
    roles = server_roles(server.process.pid)
    before = {role: cpu_seconds(processes) for role, processes in roles.items()}
    batches_before = runner_batches(server)
    with GpuSampler() as gpu:
        figures = load()
    # The server idles while the client processes start: its CPU is the window's.
    began, ended = figures.pop("window")
    used = {role: cpu_seconds(processes) - before[role] for role, processes in roles.items()}
    used["client"] = figures.pop("client_cpu_s")
    images = max(1, figures["images"])
    for role, seconds in used.items():
        figures[f"{role}_cores"] = round(seconds / (ended - began), 2)
        figures[f"{role}_cpu_ms_per_image"] = round(1000 * seconds / images, 3)
    rows, batches, pass_cpu = (
        a - b for a, b in zip(runner_batches(server), batches_before, strict=True)
    )
    figures["mean_batch"] = round(rows / batches, 1) if batches else None
    # The runner's CPU outside its backbone passes' threads: the link, batching, answering.
    figures["runner_other_cpu_ms_per_image"] = round(1000 * (used["runner"] - pass_cpu) / images, 3)
    figures.update(gpu.during(began, ended))
    settle(server.base_url, server.admin_key)  # a closed loop stops with a full queue
    return figures


def runner_batches(server) -> tuple[int, int, float]:
    """Rows, passes and the passes' CPU seconds (their threads') of the runner so far."""
    with server.admin() as admin:
        batchers = admin.get("/v1/stats").json()["batchers"].values()
    return (
        sum(b["rows"] for b in batchers),
        sum(b["batches"] for b in batchers),
        sum(b["pass_cpu_s"] for b in batchers),
    )


class GpuSampler:
    """nvidia-smi's samples of the GPU's utilisation and memory, every 200 ms while in the
    block; none where there is no nvidia-smi."""

    QUERY = "--query-gpu=timestamp,utilization.gpu,memory.used"

    def __enter__(self) -> GpuSampler:
        self.samples: list[tuple[float, float, float]] = []  # (time, utilisation %, MiB)
        smi = shutil.which("nvidia-smi")
        self.process = smi and subprocess.Popen(
            [smi, self.QUERY, "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(self, *exc) -> None:
        if not self.process:
            return
        self.process.terminate()
        for line in self.process.communicate()[0].splitlines():
            with contextlib.suppress(ValueError):  # "[N/A]", or a line cut by the stop
                stamp, utilisation, memory = (field.strip() for field in line.split(","))
                when = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((when, float(utilisation), float(memory)))

    def during(self, began: float, ended: float) -> dict:
        """Mean utilisation and most memory used between two wall-clock times."""
        inside = [(u, m) for when, u, m in self.samples if began <= when <= ended]
        if not inside:
            return {}
        return {
            "gpu_util_percent": round(statistics.mean(u for u, _ in inside), 1),
            "gpu_memory_mib": max(m for _, m in inside),
        }
