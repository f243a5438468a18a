"""The measured GPU run (issue 31), one command on the GPU host, from the bundle:

    bash PARTS/part-05/run.sh PARTS python bench/gpu_run.py      # about 6 minutes
    python bench/gpu_run.py --device cpu --seconds 3 --heads 50  # a rehearsal here

Everything side by side on the same card in this one run (the ratios are what count):
1. ONNX Runtime alone on the served lite0 graphs, fp32 and fp16: images/s at batch 8, 32
   and 128 (preprocessed uint8 rows, as the runner feeds them).
2. Graft over HTTP in fp32, 1,000 heads seeded in the registry: 8-image multipart
   requests and single raw JPEG bodies, closed loop from several client processes
   (images/s, p50, p99); then single images at half that saturating rate, open loop
   (p50, p99).
3. Heads created over HTTP from 300 photos: frozen (`fine_tune: off`) and fine-tuned
   (`on`), seconds to 201.
4. The same server restarted in fp16: 8-image requests' images/s, and the frozen head's
   answers to 256 photos against fp32's (top-1 agreement).
5. The same heads created on the CPU (GRAFT_DEVICE=cpu, the host's cores).
Prints each figure as it comes and a summary; `--out` writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import crops
from bench.serving import Requests, open_loop, p99_ms, seed_heads
from deploy.local_server import BENTOML, start_server, stop_server
from models.export import ensure_variant
from models.preprocess import decode_image
from models.runtime import Backbone
from service.settings import Settings, usable_cores

BACKBONE = "efficientnet_lite0"
PHOTOS = 300


def photos(n: int, seed: int) -> list[tuple[str, bytes]]:
    half = n // 2
    return [("temple", p) for p in crops("china.jpg", half, seed=seed)] + [
        ("flower", p) for p in crops("flower.jpg", n - half, seed=seed)
    ]


def raw_throughput(device: str, seconds: float) -> dict[str, dict[int, float]]:
    """ONNX Runtime alone on the served graphs: images/s per batch size, per variant."""
    settings = Settings()
    spec = settings.catalog[BACKBONE]
    rows = np.stack([decode_image(p, spec.image_preprocessing, 10**8) for _, p in photos(64, 1)])
    out: dict[str, dict[int, float]] = {}
    for variant in ("fp32", "fp16"):
        path = ensure_variant(spec, settings.backbone_dir, variant)
        backbone = Backbone(spec, path, device=device, max_batch_size=256)
        out[variant] = {}
        for size in (8, 32, 128):
            batch = np.concatenate([rows] * (1 + size // len(rows)))[:size]
            backbone.embed_images(batch)  # warm-up: cuDNN's search for this shape
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                backbone.embed_images(batch)
                done += size
            out[variant][size] = done / (time.perf_counter() - start)
            print(f"ONNX Runtime {variant} batch {size}: {out[variant][size]:.0f} images/s")
    return out


def _client_process(args: tuple) -> tuple[int, float, list[float], int]:
    """One client process's closed loop: (answered, seconds, latencies, errors)."""
    base, targets, images, per_request, connections, seconds, seed = args
    random.seed(seed)
    latencies: list[float] = []
    errors = 0

    requests = Requests(base, targets, images, per_request, "raw")

    async def loop() -> float:
        nonlocal errors
        deadline = time.perf_counter() + seconds
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def one() -> None:
                nonlocal errors
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    response = await client.post(**requests.make())
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1

            start = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(connections)))
            return time.perf_counter() - start

    elapsed = asyncio.run(loop())
    return len(latencies), elapsed, latencies, errors


def closed_loop(base, targets, images, per_request, processes, connections, seconds) -> dict:
    """Images/s, p50 and p99 from `processes` client processes of `connections` each."""
    jobs = [
        (base, targets, images, per_request, connections, seconds, seed)
        for seed in range(processes)
    ]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_client_process, jobs)
    answered = sum(r[0] for r in results)
    elapsed = max(r[1] for r in results)
    latencies = np.array([x for r in results for x in r[2]]) * 1000
    return {
        "images_per_s": per_request * answered / elapsed,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
        "errors": sum(r[3] for r in results),
    }


def create_heads(server) -> dict:
    """Seconds to 201 of a head from PHOTOS photos, frozen and fine-tuned; the frozen
    head's id (for the fp16 comparison)."""
    examples = [
        {"label": label, "image": base64.b64encode(p).decode()} for label, p in photos(PHOTOS, 7)
    ]
    out: dict = {}
    with server.new_tenant("heads") as client:
        for mode in ("off", "on"):
            start = time.perf_counter()
            created = client.post(
                "/v1/heads",
                json={"name": mode, "backbone": BACKBONE, "fine_tune": mode, "examples": examples},
            )
            out[f"create_{mode}_s"] = time.perf_counter() - start
            assert created.status_code == 201, created.text
            fine_tuning = created.json()["metrics"].get("fine_tuning") or {}
            print(
                f"head of {PHOTOS} photos, fine_tune {mode}: {out[f'create_{mode}_s']:.1f} s to"
                f" 201 ({fine_tuning.get('chosen', 'frozen')})"
            )
            if mode == "off":
                out["frozen_head"] = created.json()["id"]
                out["key"] = client.headers["Authorization"].removeprefix("Bearer ")
    return out


def labels_of(base: str, head_id: str, key: str, images: list[bytes]) -> list[str]:
    answers = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for start in range(0, len(images), 16):
            files = [("image", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(images[start : start + 16])]  # fmt: skip
            response = client.post(
                f"/v1/heads/{head_id}/predict",
                files=files,
                headers={"Authorization": f"Bearer {key}"},
            )
            response.raise_for_status()
            answers += [p["label"] for p in response.json()["predictions"]]
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seconds", type=float, default=15, help="per load phase")
    parser.add_argument("--heads", type=int, default=1000)
    parser.add_argument("--client-processes", type=int, default=max(2, usable_cores() // 4))
    parser.add_argument("--connections", type=int, default=32, help="per client process")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cores = usable_cores()
    print(
        f"# bench/gpu_run.py: {args.device}, {cores} cores, {args.heads} heads,"
        f" {args.client_processes} client processes x {args.connections} connections"
    )
    results: dict = {"device": args.device, "cores": cores}
    if args.device == "cuda":
        import onnxruntime as ort

        ort.preload_dlls()
        try:
            import torch

            results["card"] = torch.cuda.get_device_name(0)
        except Exception as exc:  # torch may be absent: the card stays unnamed
            results["card"] = f"unknown ({exc})"
        print(f"card: {results['card']}")
    started = time.perf_counter()
    results["raw"] = raw_throughput(args.device, args.seconds / 3)

    scratch = Path(tempfile.mkdtemp(prefix="graft-gpu-run-"))
    targets = seed_heads(scratch / "graft.sqlite3", args.heads, 1280, backbone=BACKBONE)
    images = [p for _, p in photos(32, 3)]
    env = {
        "GRAFT_BACKBONES": BACKBONE,
        "GRAFT_DEVICE": args.device,
        "GRAFT_SYNC_TRAINING_TIMEOUT_S": "900",
        "GRAFT_RATE_LIMIT_PER_S": "0",
    }
    server = start_server(BENTOML, scratch, Settings().backbone_dir, {**env, "GRAFT_VARIANT": "fp32"})  # fmt: skip
    try:
        load = (server.base_url, targets, images)
        for per_request in (8, 1):
            r = closed_loop(*load, per_request, args.client_processes, args.connections, args.seconds)  # fmt: skip
            results[f"http_fp32_{per_request}"] = r
            print(f"HTTP fp32, {per_request} per request: {r['images_per_s']:.0f} images/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['errors']} errors")  # fmt: skip
        half = results["http_fp32_1"]["images_per_s"] / 2
        single = Requests(server.base_url, targets, images, 1, "raw")
        answered = asyncio.run(open_loop(single, half, args.seconds))
        latencies = [s * 1000 for _, s in answered]
        results["half_load"] = {
            "rate": half,
            "p50_ms": statistics.median(latencies),
            "p99_ms": p99_ms(answered),
        }
        print(f"single images at {half:.0f}/s (half): p50 {results['half_load']['p50_ms']:.1f} ms, p99 {results['half_load']['p99_ms']:.1f} ms")  # fmt: skip
        created = create_heads(server)
        results["heads_gpu"] = {k: v for k, v in created.items() if k.endswith("_s")}
        asked = [p for _, p in photos(256, 11)]
        fp32_labels = labels_of(server.base_url, created["frozen_head"], created["key"], asked)
    finally:
        stop_server(server)

    server = start_server(BENTOML, scratch, Settings().backbone_dir, {**env, "GRAFT_VARIANT": "fp16"})  # fmt: skip
    try:
        r = closed_loop(server.base_url, targets, images, 8, args.client_processes, args.connections, args.seconds)  # fmt: skip
        results["http_fp16_8"] = r
        fp16_labels = labels_of(server.base_url, created["frozen_head"], created["key"], asked)
        agreement = float(np.mean(np.array(fp16_labels) == np.array(fp32_labels)))
        results["fp16_agreement"] = agreement
        print(f"HTTP fp16, 8 per request: {r['images_per_s']:.0f} images/s; top-1 agreement with fp32 {agreement:.4f} over {len(asked)} photos")  # fmt: skip
    finally:
        stop_server(server)
    results["gpu_seconds"] = time.perf_counter() - started

    cpu_scratch = Path(tempfile.mkdtemp(prefix="graft-cpu-run-"))
    server = start_server(BENTOML, cpu_scratch, Settings().backbone_dir, {**env, "GRAFT_DEVICE": "cpu"})  # fmt: skip
    try:
        print("the same heads on the CPU:")
        results["heads_cpu"] = {k: v for k, v in create_heads(server).items() if k.endswith("_s")}
    finally:
        stop_server(server)

    raw32 = results["raw"]["fp32"][32]
    summary = {
        "HTTP 8-image requests, images/s (fp32)": results["http_fp32_8"]["images_per_s"],
        "... ÷ ONNX Runtime alone at batch 32": results["http_fp32_8"]["images_per_s"] / raw32,
        "HTTP single raw JPEGs, images/s": results["http_fp32_1"]["images_per_s"],
        "p99 single image at half load, ms": results["half_load"]["p99_ms"],
        "fp16 ÷ fp32 served (8-image requests)": results["http_fp16_8"]["images_per_s"]
        / results["http_fp32_8"]["images_per_s"],
        "fp16 top-1 agreement": results["fp16_agreement"],
        "head of 300, frozen, s (device / CPU)": (
            results["heads_gpu"]["create_off_s"],
            results["heads_cpu"]["create_off_s"],
        ),
        "head of 300, fine-tuned, s (device / CPU)": (
            results["heads_gpu"]["create_on_s"],
            results["heads_cpu"]["create_on_s"],
        ),
        "seconds on the device (phases 1-4)": results["gpu_seconds"],
    }
    print("\n## Summary")
    for name, value in summary.items():
        shown = ", ".join(f"{v:.2f}" for v in value) if isinstance(value, tuple) else f"{value:.3f}"
        print(f"| {name} | {shown} |")
    if args.out:
        args.out.write_text(json.dumps({**results, "summary": summary}, indent=2, default=str))


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    main()
