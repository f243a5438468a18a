"""Does fine-tuning an image head's top (LoRA on the last stage and head convolution,
trained on augmented views; adapters/finetune.py) beat the frozen head? (Issue 13.)

    python bench/finetune_image.py                                   # flowers, lite0
    python bench/finetune_image.py --data ../shared/data/images/chest_xray_pneumonia --val test
    python bench/finetune_image.py --per-label 60 --backbone efficientnet_lite2

In-process, as the service trains (the served ONNX trunk, the top in PyTorch on the CPU,
the production functions; GRAFT_DATA_DIR says where the exports are): the trunk runs over each training image's centre crop and `VIEWS_PER_IMAGE` augmented views;
the frozen head (adapters.heads.train_head on the centre crops' embeddings) and the head
on the tuned top are scored on the validation split as served (centre crop). Then the
whole of `fine_tune: on` (`compare`: three folds, then all the images) is timed: what a
head's creation adds. `--per-label` takes the first N training images of each label.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.finetune import (
    ImageExamples,
    centre_activations,
    compare,
    embed_images,
    onnx_trunk,
)
from adapters.heads import predict_proba, train_head
from bench.accuracy import image_split
from models.export import ensure_split
from service.settings import Settings

FLOWERS = ROOT.parent / "shared" / "data" / "images" / "flowers"
MAX_PIXELS = 10**8


def accuracy(top, factors, train: np.ndarray, labels: list[str], val: np.ndarray, truth) -> float:
    head = train_head(embed_images(top, train, factors), labels, seed=0)
    p = predict_proba(embed_images(top, val, factors), head.weights, head.bias)
    return float(np.mean(np.array(head.labels)[p.argmax(1)] == np.array(truth)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=FLOWERS)
    parser.add_argument("--train", default="train")
    parser.add_argument("--val", default="val")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--per-label", type=int, default=0, help="0: every training image")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    spec = settings.catalog[args.backbone]
    pre = spec.preprocessing
    train = image_split(args.data / args.train)
    if args.per_label:
        train = [
            row
            for label in sorted({lab for lab, _ in train})
            for row in [r for r in train if r[0] == label][: args.per_label]
        ]
    val = image_split(args.data / args.val)
    labels = [label for label, _ in train]
    images = [path.read_bytes() for _, path in train]
    _, top = spec.build_split()
    # The served trunk, as training runs it.
    trunk = onnx_trunk(ensure_split(spec, settings.backbone_dir)[0])

    started = time.perf_counter()
    examples = ImageExamples.of(trunk, top, images, pre, MAX_PIXELS)
    trunk_s = time.perf_counter() - started
    val_hidden = centre_activations(trunk, [p.read_bytes() for _, p in val], pre, MAX_PIXELS)
    truth = [label for label, _ in val]
    frozen = accuracy(top, None, examples.centre, labels, val_hidden, truth)
    started = time.perf_counter()
    factors = examples.tune(range(len(labels)), labels, seed=0)
    tune_s = time.perf_counter() - started
    tuned = accuracy(top, factors, examples.centre, labels, val_hidden, truth)
    started = time.perf_counter()
    comparison = compare(examples, labels, examples.embed(None), always=True)
    compare_s = time.perf_counter() - started
    held_out = comparison.report["candidates"]
    print(
        f"# bench/finetune_image.py: {args.data.name} ({len(train)} training images,"
        f" {len(val)} validation), {spec.id}, {args.threads} threads"
    )
    print("| frozen | fine-tuned | held-out frozen / fine-tuned | trunk s | tune s | `on` s |")
    print(
        f"| {frozen:.3f} | {tuned:.3f} | {held_out['frozen']['cv_accuracy']:.3f} /"
        f" {held_out['fine_tuned']['cv_accuracy']:.3f} | {trunk_s:.0f} | {tune_s:.0f} |"
        f" {trunk_s + compare_s:.0f} |"
    )


if __name__ == "__main__":
    main()
