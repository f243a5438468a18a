"""How fast decoded images cross from an API worker to a backbone runner process.

    python bench/handoff.py            # about 1 minute

Two transports, side by side in one run, each between two processes on this machine:
1. BentoML's own composition: a runner service with a batchable API and a front service
   that holds it with `bentoml.depends` (BentoML serves the dependency in its own
   process and calls it over HTTP on a Unix socket, arrays pickled).
2. Graft's runner link (`service/runner.py`): a Unix socket carrying pickled arrays
   (protocol 5), one persistent connection per worker.
The runner returns a 1280-float embedding per image without computing anything, so
only the hand-off is timed. Sequential calls of 1 and 8 decoded 224x224 images: wall
time per call and CPU per call, summed over every process of each side.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bentoml

from deploy.local_server import free_port, wait_until_up

DIM = 1280
CALLS = 400


def fake_embeddings(images: np.ndarray) -> np.ndarray:
    return np.ones((len(images), DIM), np.float32)


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class EchoRunner:
    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=1)
    def embed(self, images: np.ndarray) -> np.ndarray:
        return fake_embeddings(images)


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class Front:
    runner = bentoml.depends(EchoRunner)

    @bentoml.api
    def run(self, rows: int, calls: int) -> float:
        """Seconds for `calls` sequential hand-offs of `rows` images."""
        images = np.zeros((rows, 224, 224, 3), np.uint8)
        start = time.perf_counter()
        for _ in range(calls):
            self.runner.embed(images)
        return time.perf_counter() - start


def tree_cpu(pid: int) -> float:
    process = psutil.Process(pid)
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def bentoml_composition(rows_list) -> dict[int, tuple[float, float]]:
    import subprocess

    port = free_port()
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "OTEL_SDK_DISABLED": "true"}
    server = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "bench.handoff:Front", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/readyz")
        results = {}
        for rows in rows_list:
            httpx.post(f"{base}/run", json={"rows": rows, "calls": 20}, timeout=300)  # warm-up
            cpu = tree_cpu(server.pid)
            seconds = httpx.post(
                f"{base}/run", json={"rows": rows, "calls": CALLS}, timeout=300
            ).json()
            results[rows] = (seconds / CALLS, (tree_cpu(server.pid) - cpu) / CALLS)
        return results
    finally:
        server.terminate()
        server.wait(timeout=30)


def runner_link(rows_list) -> dict[int, tuple[float, float]]:
    import multiprocessing

    from service.runner_client import RunnerClient
    from service.runner_server import serve_forever

    path = Path(tempfile.mkdtemp(prefix="graft-handoff-")) / "runner.sock"
    context = multiprocessing.get_context("spawn")
    runner = context.Process(
        target=serve_forever, args=(path, {"echo": fake_embeddings}), daemon=True
    )
    runner.start()
    client = RunnerClient(str(path), connect_timeout_s=60)
    me = psutil.Process()
    results = {}
    try:
        for rows in rows_list:
            images = np.zeros((rows, 224, 224, 3), np.uint8)
            for _ in range(20):
                client.embed("echo", images).result()
            cpu = tree_cpu(runner.pid) + sum(me.cpu_times()[:2])
            start = time.perf_counter()
            for _ in range(CALLS):
                client.embed("echo", images).result()
            seconds = time.perf_counter() - start
            cpu = tree_cpu(runner.pid) + sum(me.cpu_times()[:2]) - cpu
            results[rows] = (seconds / CALLS, cpu / CALLS)
    finally:
        client.close()
        runner.terminate()
        runner.join(timeout=30)
    return results


def main() -> None:
    rows_list = (1, 8)
    print(f"# bench/handoff.py: {CALLS} sequential calls per row count, {os.cpu_count()} cores")
    print(f"{'transport':<28} {'rows':>4} {'ms per call':>11} {'CPU ms per call':>15}")
    measured = {
        "BentoML depends (HTTP/UDS)": bentoml_composition(rows_list),
        "runner link (UDS, pickle 5)": runner_link(rows_list),
    }
    for name, results in measured.items():
        for rows, (wall, cpu) in results.items():
            print(f"{name:<28} {rows:>4} {wall * 1000:11.2f} {cpu * 1000:15.2f}")
    (b, r) = measured.values()
    for rows in rows_list:
        print(
            f"BentoML ÷ runner link, {rows} rows: {b[rows][0] / r[rows][0]:.1f}× the time, "
            f"{b[rows][1] / r[rows][1]:.1f}× the CPU"
        )


if __name__ == "__main__":
    main()
