"""Voice heads on FSDD (../shared/data/audio/fsdd: 6 speakers say the digits, 8 kHz WAV).

    python bench/voice.py                  # about 6 minutes on 2 cores
    python bench/voice.py --skip-http      # the accuracy only
    python bench/voice.py --skip-accuracy --client wrk   # the load from wrk

1. Accuracy, in-process on the served graph (fp32) with the service's own `train_head`
   (each head chooses its depths on its own folds): who speaks with 3 clips per speaker,
   which digit with 3, 10 and 30 clips per digit, 10 draws each, validated on every
   other clip; beside it the embedding alone. Weak transfer: heads whose labels carry
   nothing the encoder hears (labels shuffled), and what their metrics warn.
2. Over HTTP, a real server loading the speech encoder alone:
   - head creation: 60 clips (10 per speaker) in one JSON request, fresh tenant, to 201;
   - the download against the server: a digit head (10 per digit) predicts every other
     clip both ways; top-1 agreement;
   - throughput: 1 s clips, one per request as a raw audio/wav body and 8 per request as
     multipart files, from 16 aiohttp connections (or `--client wrk`: Debian's wrk, a C load
     generator that leaves the cores to the server), over 1,000 heads (seeded),
     against ONNX Runtime alone in this process on the same clips (its best of batch 1,
     8, 32, one session or a lane per core) measured in turns with it; and where the CPU
     goes per clip: the load client (this process), the API workers, the runner.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.heads import predict_proba, train_head
from bench.common import DATA, served
from bench.load import (
    Requests,
    closed_loop,
    cpu_seconds,
    own_cpu_seconds,
    seed_heads,
    server_roles,
    wrk_loop,
)
from deploy.local_server import BENTOML, start_server, stop_server
from graft.inputs import clip_bytes
from models.audio import decode_audio, pad_waveforms
from models.export import ensure_onnx
from models.runtime import Backbone
from service.settings import Settings, usable_cores

FSDD = DATA / "audio" / "fsdd"
BACKBONE = "resemblyzer_ge2e"
DRAWS = 10


def fsdd() -> list[tuple[str, str, bytes]]:
    """(speaker, digit, WAV bytes) of every clip."""
    return [
        (path.parent.name, path.name.split("_")[0], path.read_bytes())
        for path in sorted(FSDD.glob("*/*.wav"))
    ]


def draw(labels: np.ndarray, per_label: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_label` rows of each label for training, the rest for validation."""
    rng = np.random.default_rng(seed)
    train = np.concatenate(
        [rng.choice(np.flatnonzero(labels == label), per_label, replace=False)
         for label in np.unique(labels)]
    )  # fmt: skip
    return train, np.setdiff1d(np.arange(len(labels)), train)


def accuracy(rows, labels, layout, per_label: int, *, alone: bool = False) -> tuple[float, list]:  # fmt: skip
    """Mean validation accuracy over the draws, and the depths each head chose."""
    if alone:
        rows, layout = rows[:, : layout.embedding_dim], layout.deepest(0)
    scores, chosen = [], []
    for seed in range(DRAWS):
        train, val = draw(labels, per_label, seed)
        head = train_head(rows[train], list(labels[train]), layout=layout, seed=seed)
        columns = layout.columns(head.depths)
        predicted = predict_proba(rows[val][:, columns], head.weights, head.bias)
        scores.append(np.mean(np.array(head.labels)[predicted.argmax(axis=1)] == labels[val]))
        chosen.append(head.depths)
    return float(np.mean(scores)), chosen


def part_accuracy(clips, backbone: Backbone, layout) -> None:
    pre = backbone.spec.audio_preprocessing
    waveforms = [decode_audio(data, pre, 60) for _, _, data in clips]
    start = time.perf_counter()
    rows = backbone.embed_rows(waveforms, depths=True)
    seconds = sum(len(w) for w in waveforms) / pre.sample_rate
    print(
        f"embedded {len(rows)} clips ({seconds:.0f} s of audio) in"
        f" {time.perf_counter() - start:.1f} s, in-process"
    )
    speakers = np.array([s for s, _, _ in clips])
    digits = np.array([d for _, d, _ in clips])
    print("\n## 1. Accuracy (in-process, fp32; mean of 10 draws; validated on the rest)")
    print("| task | clips per label | head as served (depths chosen) | embedding alone |")
    print("|---|---|---|---|")
    for task, labels, sizes in (("who speaks", speakers, (3, 10)), ("which digit", digits, (3, 10, 30))):  # fmt: skip
        for per_label in sizes:
            served_accuracy, chosen = accuracy(rows, labels, layout, per_label)
            alone_accuracy, _ = accuracy(rows, labels, layout, per_label, alone=True)
            counts = {k: chosen.count(k) for k in sorted(set(chosen))}
            print(
                f"| {task} | {per_label} | {served_accuracy:.3f} {counts} | {alone_accuracy:.3f} |"
            )

    print("\n## Weak transfer: labels the encoder cannot hear (digits shuffled), 10 per label")
    rng = np.random.default_rng(0)
    for seed in range(3):
        train, _ = draw(digits, 10, seed)
        shuffled = rng.permutation(digits[train])
        head = train_head(rows[train], list(shuffled), layout=layout, seed=seed)
        metrics = head.metrics
        print(
            f"draw {seed}: held-out accuracy {metrics['cv_accuracy']:.3f}, majority"
            f" {metrics['majority_baseline']:.3f}; warnings: {metrics['warnings']}"
        )


def one_second(data: bytes, rate: int) -> bytes:
    """A clip cut or padded with silence to 1 s, as 16-bit WAV at `rate`."""
    pcm = decode_audio(data, Settings().catalog[BACKBONE].audio_preprocessing, 60)
    return clip_bytes((np.pad(pcm, (0, max(0, rate - len(pcm))))[:rate], rate))


def in_process_best(backbone_path: Path, spec, clips: list[np.ndarray], seconds: float) -> float:
    """Clips/s of ONNX Runtime alone: the best of batch 1, 8 and 32, with one session over
    every core or one single-threaded session per core side by side (the runner's lanes)."""
    cores = usable_cores()
    best = 0.0
    for threads, lanes in ((0, 1), (1, cores)):
        sessions = [Backbone(spec, backbone_path, intra_op_threads=threads) for _ in range(lanes)]
        for size in (1, 8, 32):
            feeds = pad_waveforms((clips * (1 + size // len(clips)))[:size])
            done = [0] * lanes
            start = time.perf_counter()

            def lane(i: int, feeds=feeds, done=done, start=start, size=size, sessions=sessions) -> None:  # fmt: skip
                while time.perf_counter() - start < seconds:
                    sessions[i].session.run(["embedding"], feeds)
                    done[i] += size

            threads_ = [threading.Thread(target=lane, args=(i,)) for i in range(lanes)]
            for thread in threads_:
                thread.start()
            for thread in threads_:
                thread.join()
            best = max(best, sum(done) / (time.perf_counter() - start))
    return best


def part_http(clips, args) -> None:
    import base64

    settings = Settings()
    spec = settings.catalog[BACKBONE]
    scratch = Path(tempfile.mkdtemp(prefix="graft-voice-"))
    heads = seed_heads(scratch / "graft.sqlite3", args.heads, spec.embedding_dim, backbone=BACKBONE)
    server = start_server(
        BENTOML,
        scratch,
        settings.backbone_dir,
        {"GRAFT_BACKBONES": BACKBONE, "GRAFT_SYNC_TRAINING_TIMEOUT_S": "600"},
    )
    try:
        print(f"\n## 2. Over HTTP ({usable_cores()} cores, {BACKBONE}, fp32)")
        rng = np.random.default_rng(0)
        with server.new_tenant("voices") as client:
            picked = [
                i
                for speaker in sorted({s for s, _, _ in clips})
                for i in rng.choice([j for j, c in enumerate(clips) if c[0] == speaker], 10, replace=False)
            ]  # fmt: skip
            examples = [{"label": clips[i][0], "audio": base64.b64encode(clips[i][2]).decode()} for i in picked]  # fmt: skip
            start = time.perf_counter()
            created = client.post("/v1/heads", json={"name": "who", "backbone": BACKBONE, "examples": examples})  # fmt: skip
            seconds = time.perf_counter() - start
            assert created.status_code == 201, created.text
            metrics = created.json()["metrics"]
            print(
                f"head creation, 60 clips (10 per speaker): {seconds:.2f} s to 201"
                f" (cv accuracy {metrics['cv_accuracy']:.3f}, depths {metrics['depths']['chosen']})"
            )

        with server.new_tenant("digits") as client:
            digits = np.array([d for _, d, _ in clips])
            train, val = draw(digits, 10, 0)
            examples = [{"label": clips[i][1], "audio": base64.b64encode(clips[i][2]).decode()} for i in train]  # fmt: skip
            head = client.post("/v1/heads", json={"name": "digits", "backbone": BACKBONE, "examples": examples}).json()  # fmt: skip
            served_labels = []
            for start_ in range(0, len(val), 64):
                chunk = val[start_ : start_ + 64]
                answer = client.post(
                    f"/v1/heads/{head['id']}/predict",
                    json={"inputs": [{"audio": base64.b64encode(clips[i][2]).decode()} for i in chunk]},
                )  # fmt: skip
                served_labels += [p["label"] for p in answer.json()["predictions"]]
            model = client.get(f"/v1/heads/{head['id']}/model.onnx").content
            session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            labels = head["labels"]
            exported = [
                labels[int(session.run(["probabilities"], {"waveform": decode_audio(clips[i][2], spec.audio_preprocessing, 60)[None]})[0].argmax())]
                for i in val
            ]  # fmt: skip
            agreement = np.mean(np.array(exported) == np.array(served_labels))
            truth = np.mean(np.array(served_labels) == digits[val])
            print(
                f"download ÷ server, top-1 agreement over {len(val)} clips: {agreement:.4f}"
                f" (the head's validation accuracy: {truth:.3f}, cv {head['metrics']['cv_accuracy']:.3f})"
            )

        seconds_clips = [
            one_second(data, 16000) for _, _, data in clips[:: max(1, len(clips) // 32)]
        ]
        pcm = [decode_audio(c, spec.audio_preprocessing, 60) for c in seconds_clips]
        onnx_path = ensure_onnx(spec, settings.backbone_dir)
        roles = server_roles(server.process.pid)
        for per_request in args.per_request:
            # One clip: a raw audio/wav body; several: multipart `audio` files.
            requests = Requests(server.base_url, heads, seconds_clips, per_request, "raw", kind="audio")  # fmt: skip

            def load(seconds: float, requests=requests) -> dict:
                if args.client == "wrk":
                    return wrk_loop(requests, args.clients, seconds, scratch)
                return asyncio.run(closed_loop(requests, args.clients, seconds))

            load(3)  # warm-up
            ratios = []
            for round_ in range(args.rounds):
                before = {role: cpu_seconds(p) for role, p in roles.items()}
                client_before = own_cpu_seconds()
                http = load(args.duration)
                rate = per_request * http["requests"] / http["seconds"]
                # CPU per clip, ms: the load client (this process), API workers, runner.
                spent = {role: cpu_seconds(p) - before[role] for role, p in roles.items()}
                spent["client"] = own_cpu_seconds() - client_before
                clips_sent = max(1, per_request * http["requests"])
                per_clip = {k: round(1000 * v / clips_sent, 2) for k, v in spent.items()}
                alone = in_process_best(onnx_path, spec, pcm, args.duration / 6)
                ratios.append(rate / alone)
                print(
                    f"{per_request} per request, round {round_ + 1}: HTTP {rate:.1f} clips/s"
                    f" (p50 {http['p50_ms']:.0f} ms, p99 {http['p99_ms']:.0f} ms,"
                    f" {http['errors']} errors) over {len(heads)} heads; in-process"
                    f" {alone:.1f} clips/s; ratio {ratios[-1]:.3f}; CPU ms per clip {per_clip}"
                )
            median = statistics.median(ratios)
            print(f"{per_request} per request: HTTP ÷ in-process, median of {args.rounds}: {median:.3f}")  # fmt: skip
    finally:
        stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--heads", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--client", choices=("aiohttp", "wrk"), default="aiohttp")
    parser.add_argument("--duration", type=float, default=20, help="seconds per HTTP phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--per-request", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8]
    )
    args = parser.parse_args()
    clips = fsdd()
    backbone, layout = served(BACKBONE)
    print(f"# bench/voice.py: {len(clips)} FSDD clips, {BACKBONE}, {usable_cores()} cores")
    if not args.skip_accuracy:
        part_accuracy(clips, backbone, layout)
    if not args.skip_http:
        part_http(clips, args)


if __name__ == "__main__":
    main()
