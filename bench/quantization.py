"""INT8 and fp16 against fp32: accuracy of a head on each, and backbone throughput.

    python bench/quantization.py --images ../shared/data/images/flowers \
        --text ../shared/data/text/uci_sentiment_labelled_sentences/yelp_labelled.txt

The same logistic-regression training as the service (adapters.heads.train_head) on the
embeddings of each variant; validation accuracy on the held-out split; then ONNX Runtime
throughput of each variant at batch 32 on the same inputs (here, on the CPU: fp16 is
made for a GPU, and its CPU speed says nothing of it; its accuracy is what counts here).
With --avx2-only the INT8 rows are embedded once more as a CPU with AVX2 and no VNNI
would (QEMU's user mode, models/cpu.py; a few minutes): its accuracy and cosine should be
this CPU's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import image_split, probe_accuracy, read_texts, text_split
from models import cpu
from models.export import ensure_variant
from models.preprocess import decode_image, tokenize
from models.quantize import VARIANTS
from models.runtime import Backbone
from service.settings import (
    Settings,
    get_backbone,
)


def throughput(embed, rows, seconds: float = 5) -> float:
    embed(rows)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        embed(rows)
        done += len(rows)
    return done / (time.perf_counter() - start)


def on_avx2_only(backbone: Backbone, path: Path, rows) -> np.ndarray:
    """The rows' embeddings by the model at `path` as an AVX2-only CPU computes them, in
    the batches `backbone` runs (a dynamically quantised text model's scales are per batch)."""
    step = backbone.max_batch_size
    chunks = [rows[s : s + step] for s in range(0, len(rows), step)]
    if backbone.spec.modality == "image":
        feeds = [{"image": chunk} for chunk in chunks]
    else:
        feeds = [tokenize(list(chunk), backbone.tokenizer, backbone.pad_id) for chunk in chunks]
    with tempfile.TemporaryDirectory() as scratch:
        out = cpu.embed_as(cpu.AVX2_ONLY, [(path, f) for f in feeds], Path(scratch))
    return np.concatenate(out)


def compare(
    name: str, backbone_id: str, train, y_train, val, y_val, embed_name: str, avx2_only: bool
) -> None:
    spec = get_backbone(backbone_id)
    print(f"\n{name} ({backbone_id}, {len(y_train)} train, {len(y_val)} val)")
    print(
        f"{'variant':>8} {'val accuracy':>12} {'rows/s (batch 32)':>18} {'file MB':>8} {'cos to fp32':>11}"
    )
    reference = None
    for variant in VARIANTS:
        path = ensure_variant(spec, Settings().backbone_dir, variant)
        backbone = Backbone(spec, path)
        embed = getattr(backbone, embed_name)
        x_train, x_val = embed(train), embed(val)
        if reference is None:
            reference = x_val
        cosine = float((x_val * reference).sum(axis=1).mean())
        acc = probe_accuracy(x_train, y_train, x_val, y_val)
        speed = throughput(embed, val[:32])
        print(
            f"{variant:>8} {acc:12.3f} {speed:18.1f} {path.stat().st_size / 1e6:8.1f} {cosine:11.4f}"
        )
        if variant == "int8" and avx2_only:
            x_train, x_val = (on_avx2_only(backbone, path, rows) for rows in (train, val))
            acc = probe_accuracy(x_train, y_train, x_val, y_val)
            cosine = float((x_val * reference).sum(axis=1).mean())
            print(
                f"{'int8 on AVX2 only (emulated)':>8} {acc:12.3f} {'-':>18} {'':8} {cosine:11.4f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=Path)
    parser.add_argument("--text", type=Path)
    parser.add_argument("--avx2-only", action="store_true", help="INT8 as an AVX2-only CPU too")
    args = parser.parse_args()
    print(f"CPU: {cpu.describe()}")
    if args.images:
        spec = get_backbone("efficientnet_lite0")
        splits = []
        for part in ("train", "val"):
            items = image_split(args.images / part)
            rows = np.stack(
                [decode_image(p.read_bytes(), spec.preprocessing, 10**9) for _, p in items]
            )
            splits += [rows, [label for label, _ in items]]
        compare(args.images.name, spec.id, *splits, "embed_images", args.avx2_only)
    if args.text:
        train, val = text_split(
            read_texts(args.text), seed=0, train_per_label=None, val_per_label=None
        )
        compare(
            args.text.name, "minilm_l6",
            [t for _, t in train], [label for label, _ in train],
            [t for _, t in val], [label for label, _ in val], "embed_texts", args.avx2_only,
        )  # fmt: skip


if __name__ == "__main__":
    main()
