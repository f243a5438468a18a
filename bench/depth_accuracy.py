"""Heads on the embedding alone against heads that choose their depths, on the shared data.

    python bench/depth_accuracy.py                  # about 3 minutes on 2 cores
    python bench/depth_accuracy.py --text-backbone mpnet_base_v2

In-process, on the served ONNX graphs (fp32): every input is embedded once with its depths
(`Backbone.embed_rows(..., depths=True)`, models/depths.py); each head is trained by the
service's own `adapters.heads.train_head`, once on the embedding alone and once with the
row layout, where it chooses its depths on its own folds (adapters/depth_choice.py).
- text (MiniLM by default): AG News and the three UCI sentiment files, 8 per label,
  5 draws (seeds 0-4), validated on up to 1,000 other rows of the file;
- images (lite0): flowers (train → val), chest X-rays (train → test), PACS photos →
  sketches, cartoons and paintings (no adaptation).
Prints each set's accuracy both ways and the depths chosen.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.depth_choice import RowLayout
from adapters.heads import predict_proba, train_head
from bench.common import DATA, embedded_folder, embedded_texts, read_texts, served

UCI = DATA / "text" / "uci_sentiment_labelled_sentences"
TEXT_SETS = {
    "ag_news": DATA / "text" / "ag_news" / "test.csv",
    "yelp": UCI / "yelp_labelled.txt",
    "amazon": UCI / "amazon_cells_labelled.txt",
    "imdb": UCI / "imdb_labelled.txt",
}
IMAGES = DATA / "images"
IMAGE_SETS = {  # name: (training folder, validation folders)
    "flowers": (IMAGES / "flowers/train", [IMAGES / "flowers/val"]),
    "chest X-rays": (
        IMAGES / "chest_xray_pneumonia/train",
        [IMAGES / "chest_xray_pneumonia/test"],
    ),
    "PACS photo →": (
        IMAGES / "pacs/photo",
        [IMAGES / "pacs" / d for d in ("sketch", "cartoon", "art_painting")],
    ),
}
PER_LABEL = 8
DRAWS = 5
VALIDATION = 1000


def both_ways(layout: RowLayout, x_train, y_train, x_vals, y_vals) -> list[tuple]:
    """(accuracy alone, accuracy choosing, depths) per validation set."""
    alone = train_head(x_train[:, : layout.embedding_dim], list(y_train))
    choosing = train_head(x_train, list(y_train), layout=layout)
    out = []
    for x_val, y_val in zip(x_vals, y_vals, strict=True):
        scores = []
        for head in (alone, choosing):
            columns = layout.columns(head.depths)
            predicted = predict_proba(x_val[:, columns], head.weights, head.bias).argmax(axis=1)
            scores.append(float(np.mean(np.array(head.labels)[predicted] == np.array(y_val))))
        out.append((*scores, choosing.depths))
    return out


def bench_text(backbone_id: str) -> None:
    backbone, layout = served(backbone_id)
    for name, path in TEXT_SETS.items():
        rows = read_texts(path)
        y = np.array([label for label, _ in rows])
        rng = np.random.default_rng(1000)
        # One sample of the file is embedded; the draws train and validate within it.
        sample = rng.permutation(len(rows))[: VALIDATION + 100 * len(set(y))]
        texts = [rows[i][1] for i in sample]
        x = embedded_texts(backbone, texts)
        y = y[sample]
        results = []
        for seed in range(DRAWS):
            draw = np.random.default_rng(seed)
            train = np.concatenate(
                [
                    draw.choice(np.flatnonzero(y == c), PER_LABEL, replace=False)
                    for c in sorted(set(y))
                ]
            )
            val = np.setdiff1d(np.arange(len(y)), train)[:VALIDATION]
            results += both_ways(layout, x[train], y[train], [x[val]], [y[val]])
        print(
            f"{backbone_id:14s} {name:14s} alone {statistics.mean(r[0] for r in results):.3f}"
            f"  choosing {statistics.mean(r[1] for r in results):.3f}"
            f"  depths {[r[2] for r in results]}",
            flush=True,
        )


def bench_images(backbone_id: str) -> None:
    backbone, layout = served(backbone_id)
    for name, (train, vals) in IMAGE_SETS.items():
        x_train, y_train = embedded_folder(backbone, train)
        validations = [embedded_folder(backbone, v) for v in vals]
        results = both_ways(
            layout, x_train, y_train, [v[0] for v in validations], [v[1] for v in validations]
        )
        for folder, (alone, choosing, depths) in zip(vals, results, strict=True):
            print(
                f"{backbone_id:14s} {name} {folder.name:10s} alone {alone:.3f}"
                f"  choosing {choosing:.3f}  deepest depths read {depths}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-backbone", default="minilm_l6")
    parser.add_argument("--image-backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    bench_text(args.text_backbone)
    bench_images(args.image_backbone)


if __name__ == "__main__":
    main()
