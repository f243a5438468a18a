"""The measured GPU run (issue 31), one command on the GPU host, from the bundle:

    bash PARTS/part-05/run.sh PARTS python bench/gpu_run.py      # about 7 minutes
    python bench/gpu_run.py --device cpu --seconds 3 --heads 50  # a rehearsal here

Everything side by side on the same card in this one run (the ratios are what count):
1. ONNX Runtime alone on the served lite0 graphs: fp32, fp16, and fp32 split into trunk
   and top (as a server that fine-tunes serves it): images/s at batch 8, 32 and 128
   (preprocessed uint8 rows, as the runner feeds them).
2. Graft over HTTP in fp32, 1,000 heads seeded in the registry: 8-image multipart
   requests and single raw JPEG bodies, closed loop from several client processes
   (images/s, p50, p99); then single images at half that saturating rate, open loop
   from the same processes (p50, p99).
3. Heads created over HTTP from 300 photos: frozen (`fine_tune: off`) and fine-tuned
   (`on`), seconds to 201, and where the tops were tuned.
4. The same server restarted in fp16: 8-image requests' images/s, and the frozen head's
   answers to 256 photos against fp32's (top-1 agreement).
5. fp32 again with two backbone lanes (passes side by side) in place of one.
6. The same heads created on the CPU (GRAFT_DEVICE=cpu, the host's cores).
Each load phase also says what it cost: the CPU cores that the API workers, the runner
and the clients kept busy (and their CPU per image), the runner's mean batch, and the
GPU's utilisation (nvidia-smi): whether the GPU starved, and on what. The clients are
aiohttp (bench/load.py says why).
Prints each figure as it comes and a summary; `--out` writes them as JSON after every
phase (a run cut short keeps what it measured; a phase that fails is recorded and the
run goes on). `--skip PHASE` and `--server-env NAME=VALUE` shape a rerun.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import crops
from bench.load import seed_heads, spread_closed_loop, spread_open_loop, under_load
from deploy.local_server import BENTOML, start_server, stop_server
from models.export import ensure_split, ensure_variant
from models.preprocess import decode_image
from models.runtime import Backbone
from service.settings import Settings, usable_cores

BACKBONE = "efficientnet_lite0"
PHOTOS = 300
# The run's phases, in order: ONNX Runtime alone, HTTP in fp32, heads created, HTTP in
# fp16 (and its agreement with fp32), HTTP in fp32 with two backbone lanes, the same
# heads created on the CPU.
PHASES = ("raw", "http", "heads", "fp16", "lanes", "cpu")


def photos(n: int, seed: int) -> list[tuple[str, bytes]]:
    half = n // 2
    return [("temple", p) for p in crops("china.jpg", half, seed=seed)] + [
        ("flower", p) for p in crops("flower.jpg", n - half, seed=seed)
    ]


def raw_throughput(device: str, seconds: float, out: dict[str, dict[int, float]]) -> None:
    """ONNX Runtime alone on the served graphs: images/s per batch size, per graph, into
    `out` as they come (a graph that fails leaves the others' figures)."""
    settings = Settings()
    spec = settings.catalog[BACKBONE]
    rows = np.stack([decode_image(p, spec.image_preprocessing, 10**8) for _, p in photos(64, 1)])
    fp32 = ensure_variant(spec, settings.backbone_dir, "fp32")
    graphs = {
        "fp32": {"onnx_path": fp32},
        "fp16": {"onnx_path": ensure_variant(spec, settings.backbone_dir, "fp16")},
        # What a server that fine-tunes serves in fp32: the trunk, then the top (two runs,
        # the activations between them crossing to the host and back).
        "fp32_split": {"onnx_path": fp32, "split": ensure_split(spec, settings.backbone_dir)},
    }
    for name, graph in graphs.items():
        backbone = Backbone(spec, **graph, device=device, max_batch_size=256)
        out[name] = {}
        for size in (8, 32, 128):
            batch = np.concatenate([rows] * (1 + size // len(rows)))[:size]
            backbone.embed_images(batch)  # warm-up: cuDNN's search for this shape
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                backbone.embed_images(batch)
                done += size
            out[name][size] = done / (time.perf_counter() - start)
            print(f"ONNX Runtime {name} batch {size}: {out[name][size]:.0f} images/s")


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
            if mode == "on":  # where the tops were tuned, and how long that took
                out["tuned_on_device"] = fine_tuning.get("device")
                out["tuning_s"] = fine_tuning.get("seconds")
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


class Run:
    """The run's figures, written to `out` after every phase."""

    def __init__(self, out: Path | None, **figures) -> None:
        self.out, self.figures = out, figures

    @contextlib.contextmanager
    def phase(self, name: str):
        """A phase of the run: one that fails is recorded as such, and the run goes on."""
        print(f"## {name}", flush=True)
        try:
            yield
        except Exception as exc:
            traceback.print_exc()
            self.figures.setdefault("failed", {})[name] = repr(exc)
        finally:
            self.save()

    def save(self) -> None:
        if self.out:
            self.out.write_text(json.dumps(self.figures, indent=2, default=str))


def show_load(name: str, figures: dict) -> None:
    gpu = f", GPU {figures['gpu_util_percent']:.0f}%" if "gpu_util_percent" in figures else ""
    rate = figures.get("images_per_s", figures.get("rate"))
    print(
        f"{name}: {rate:.0f} images/s, p50 {figures['p50_ms']:.1f} ms,"
        f" p99 {figures['p99_ms']:.1f} ms, {figures.get('errors', 0)} errors;"
        f" cores busy: API {figures['api_cores']}, runner {figures['runner_cores']},"
        f" clients {figures['client_cores']}; CPU ms per image: API"
        f" {figures['api_cpu_ms_per_image']}, runner {figures['runner_cpu_ms_per_image']}"
        f" ({figures['runner_other_cpu_ms_per_image']} outside its passes);"
        f" mean batch {figures['mean_batch']}{gpu}",
        flush=True,
    )


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
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every server of the run (a rerun trying GRAFT_BACKBONE_LANES=2)",
    )
    parser.add_argument(
        "--skip", action="append", default=[], choices=PHASES, help="leave a phase out (a rerun)"
    )
    args = parser.parse_args()
    cores = usable_cores()
    print(
        f"# bench/gpu_run.py: {args.device}, {cores} cores, {args.heads} heads,"
        f" {args.client_processes} client processes x {args.connections} connections"
    )
    run = Run(args.out, device=args.device, cores=cores, server_env=args.server_env)
    results = run.figures
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
    if "raw" not in args.skip:
        with run.phase("ONNX Runtime alone"):
            raw_throughput(args.device, min(3.0, args.seconds / 3), results.setdefault("raw", {}))

    scratch = Path(tempfile.mkdtemp(prefix="graft-gpu-run-"))
    targets = seed_heads(scratch / "graft.sqlite3", args.heads, 1280, backbone=BACKBONE)
    images = [p for _, p in photos(32, 3)]
    clients = (args.client_processes, args.connections, args.seconds)
    env = {
        "GRAFT_BACKBONES": BACKBONE,
        "GRAFT_DEVICE": args.device,
        "GRAFT_SYNC_TRAINING_TIMEOUT_S": "900",
        "GRAFT_RATE_LIMIT_PER_S": "0",
        **dict(setting.split("=", 1) for setting in args.server_env),
    }
    asked = [p for _, p in photos(256, 11)]
    created: dict = {}
    fp32_labels: list[str] = []
    fp32 = {**env, "GRAFT_VARIANT": "fp32"}
    with run.phase("fp32 server"), serving(run, "fp32", scratch, fp32) as server:
        load = (server.base_url, targets, images)
        if "http" not in args.skip:
            for per_request in (8, 1):
                name = f"http_fp32_{per_request}"
                with run.phase(f"HTTP fp32, {per_request} per request"):
                    results[name] = under_load(server, lambda n=per_request: spread_closed_loop(*load, n, *clients))  # fmt: skip
                    show_load(name, results[name])
            with run.phase("single images at half load"):
                half = results["http_fp32_1"]["images_per_s"] / 2
                results["half_load"] = under_load(
                    server,
                    lambda: spread_open_loop(*load, half, args.client_processes, args.seconds),
                )
                show_load(f"single images at {half:.0f}/s (half)", results["half_load"])
        if "heads" not in args.skip:
            with run.phase("heads created on the device"):
                created = create_heads(server)
                results["heads_gpu"] = head_figures(created)
                fp32_labels = labels_of(server.base_url, created["frozen_head"], created["key"], asked)  # fmt: skip

    if "fp16" not in args.skip:
        with (
            run.phase("fp16 server"),
            serving(run, "fp16", scratch, {**env, "GRAFT_VARIANT": "fp16"}) as server,
        ):
            with run.phase("HTTP fp16, 8 per request"):
                load = (server.base_url, targets, images)
                results["http_fp16_8"] = under_load(
                    server, lambda: spread_closed_loop(*load, 8, *clients)
                )
                show_load("http_fp16_8", results["http_fp16_8"])
            if created:
                with run.phase("fp16 agreement"):
                    fp16_labels = labels_of(server.base_url, created["frozen_head"], created["key"], asked)  # fmt: skip
                    agreement = float(np.mean(np.array(fp16_labels) == np.array(fp32_labels)))
                    results["fp16_agreement"] = agreement
                    print(f"top-1 agreement of fp16 with fp32: {agreement:.4f} over {len(asked)} photos")  # fmt: skip
    if "lanes" not in args.skip:
        # Two passes side by side: one's host work (gathering rows, copying them over,
        # answering) while the other's runs on the GPU. One lane is the default on cuda.
        lanes = {**env, "GRAFT_VARIANT": "fp32", "GRAFT_BACKBONE_LANES": "2"}
        with (
            run.phase("fp32 server, two lanes"),
            serving(run, "fp32, two lanes", scratch, lanes) as server,
        ):
            load = (server.base_url, targets, images)
            for per_request in (8, 1):
                name = f"http_fp32_{per_request}_two_lanes"
                with run.phase(f"HTTP fp32, {per_request} per request, two lanes"):
                    results[name] = under_load(server, lambda n=per_request: spread_closed_loop(*load, n, *clients))  # fmt: skip
                    show_load(name, results[name])
    results["gpu_seconds"] = time.perf_counter() - started

    if "cpu" not in args.skip:
        cpu_scratch = Path(tempfile.mkdtemp(prefix="graft-cpu-run-"))
        with (
            run.phase("the same heads on the CPU"),
            serving(run, "cpu", cpu_scratch, {**env, "GRAFT_DEVICE": "cpu"}) as server,
        ):
            results["heads_cpu"] = head_figures(create_heads(server))
    summarise(run)


@contextlib.contextmanager
def serving(run: Run, name: str, scratch: Path, env: dict):
    """A server of this checkout on the data in `scratch`, stopped after the block; the
    seconds it took to be ready (on a GPU, its runner's warm-up included) go to the run."""
    start = time.perf_counter()
    server = start_server(BENTOML, scratch, Settings().backbone_dir, env)
    run.figures.setdefault("ready_s", {})[name] = round(time.perf_counter() - start, 1)
    try:
        yield server
    finally:
        stop_server(server)


def head_figures(created: dict) -> dict:
    """The timings of `create_heads` and where the tops were tuned."""
    return {k: v for k, v in created.items() if k.endswith(("_s", "_device"))}


def summarise(run: Run) -> None:
    results = run.figures

    def figure(*path, divide_by: tuple = ()) -> float:
        try:
            value = results
            for key in path:
                value = value[key]
            if divide_by:
                below = results
                for key in divide_by:
                    below = below[key]
                value = value / below
            return float(value)
        except (KeyError, TypeError, ZeroDivisionError):
            return float("nan")

    summary = {
        "HTTP 8-image requests, images/s (fp32)": figure("http_fp32_8", "images_per_s"),
        "... ÷ ONNX Runtime alone at batch 32": figure(
            "http_fp32_8", "images_per_s", divide_by=("raw", "fp32", 32)
        ),
        "HTTP single raw JPEGs, images/s": figure("http_fp32_1", "images_per_s"),
        "p99 single image at half load, ms": figure("half_load", "p99_ms"),
        "fp16 ÷ fp32 served (8-image requests)": figure(
            "http_fp16_8", "images_per_s", divide_by=("http_fp32_8", "images_per_s")
        ),
        "fp16 top-1 agreement": figure("fp16_agreement"),
        "two lanes ÷ one, 8-image / single": (
            figure(
                "http_fp32_8_two_lanes", "images_per_s", divide_by=("http_fp32_8", "images_per_s")
            ),
            figure(
                "http_fp32_1_two_lanes", "images_per_s", divide_by=("http_fp32_1", "images_per_s")
            ),
        ),
        "head of 300, frozen, s (device / CPU)": (
            figure("heads_gpu", "create_off_s"),
            figure("heads_cpu", "create_off_s"),
        ),
        "head of 300, fine-tuned, s (device / CPU)": (
            figure("heads_gpu", "create_on_s"),
            figure("heads_cpu", "create_on_s"),
        ),
        "seconds on the device (phases 1-4)": figure("gpu_seconds"),
    }
    print("\n## Summary")
    for name, value in summary.items():
        shown = ", ".join(f"{v:.2f}" for v in value) if isinstance(value, tuple) else f"{value:.3f}"
        print(f"| {name} | {shown} |")
    results["summary"] = summary
    run.save()


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    main()
