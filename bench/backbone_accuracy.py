"""Each built-in backbone on the shared data: few-shot accuracy, time per row, memory.

    python bench/backbone_accuracy.py            # every built-in backbone
    python bench/backbone_accuracy.py --only mpnet_base_v2,minilm_l6
    python bench/backbone_accuracy.py --only mpnet_base_v2,minilm_l6 --variant int8

In-process, on the served ONNX graphs (fp32, one thread, as a runner lane runs them) and
the service's own head training (adapters.heads.train_head; `auto` is
adapters.transferability.choose_backbone over the text backbones measured):
- text: UCI sentiment (yelp, amazon, imdb) and AG News, 8 examples per label, 10 draws
  (seeds 0-9); validation: the rest of the UCI file, 250 per label of AG News' test set;
- images: flowers, the whole training split (60 per class), validation split.
Each text is embedded once per backbone; a draw trains on its examples' embeddings.
Time per row and memory are `Backbone.ms_per_row()` (a batch of 4, fastest of 3) and
the growth of this process's resident memory while the session loads and warms up, as the
runner reports them in `GET /v1/backbones`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.heads import predict_proba
from adapters.transferability import choose_backbone
from bench.common import image_split, probe_accuracy, read_texts, text_split
from models.export import ensure_variant
from models.preprocess import decode_image
from models.runtime import Backbone
from service.runner import resident_bytes
from service.settings import Settings

DATA = ROOT.parent / "shared" / "data"
UCI = DATA / "text" / "uci_sentiment_labelled_sentences"
TEXT_SETS = {
    "yelp": (UCI / "yelp_labelled.txt", None),
    "amazon": (UCI / "amazon_cells_labelled.txt", None),
    "imdb": (UCI / "imdb_labelled.txt", None),
    "ag_news": (DATA / "text" / "ag_news" / "test.csv", 250),
}
PER_LABEL = 8
DRAWS = 10


def load(spec, variant: str) -> tuple[Backbone, int, float]:
    path = ensure_variant(spec, Settings().backbone_dir, variant)
    before = resident_bytes()
    backbone = Backbone(spec, path, intra_op_threads=1)
    ms = backbone.ms_per_row()
    return backbone, resident_bytes() - before, ms


def bench_text(backbones: dict[str, Backbone], text_sets: dict) -> dict[str, dict[str, float]]:
    """Mean accuracy over the draws, per data set and backbone (and `auto`)."""
    results: dict[str, dict[str, float]] = {}
    for name, (path, val_cap) in text_sets.items():
        rows = read_texts(path)
        if val_cap is None:  # UCI: each draw validates on the rest of the file
            draws = [
                text_split(rows, seed=seed, train_per_label=PER_LABEL, val_per_label=None)
                for seed in range(DRAWS)
            ]
        else:  # AG News: one fixed validation sample; each draw trains on others
            pool, val = text_split(rows, seed=1000, train_per_label=None, val_per_label=val_cap)
            draws = [
                (text_split(pool, seed=seed, train_per_label=PER_LABEL, val_per_label=0)[0], val)
                for seed in range(DRAWS)
            ]
        texts = sorted({t for train, val in draws for _, t in train + val})
        index = {t: i for i, t in enumerate(texts)}
        embedded = {b: backbone.embed_texts(texts) for b, backbone in backbones.items()}
        scores: dict[str, list[float]] = {b: [] for b in [*backbones, "auto"]}
        for seed, (train, val) in enumerate(draws):
            y_train, y_val = [lab for lab, _ in train], [lab for lab, _ in val]
            xs = {
                b: (e[[index[t] for _, t in train]], e[[index[t] for _, t in val]])
                for b, e in embedded.items()
            }
            for b, (x_train, x_val) in xs.items():
                scores[b].append(probe_accuracy(x_train, y_train, x_val, y_val, seed))
            if len(backbones) > 1:
                choice = choose_backbone(
                    {b: x[0] for b, x in xs.items()}, y_train, dict.fromkeys(xs)
                )
                x_val = xs[choice.backbone][1]
                predicted = predict_proba(x_val, choice.trained.weights, choice.trained.bias)
                labels = np.array(choice.trained.labels)[predicted.argmax(axis=1)]
                scores["auto"].append(float(np.mean(labels == np.array(y_val))))
        results[name] = {b: statistics.mean(s) for b, s in scores.items() if s}
        print(
            f"{name:8s} " + "  ".join(f"{b} {m:.3f}" for b, m in results[name].items()),
            flush=True,
        )
    return results


def bench_images(backbones: dict[str, Backbone]) -> dict[str, float]:
    root = DATA / "images" / "flowers"
    train, val = image_split(root / "train"), image_split(root / "val")
    results = {}
    for b, backbone in backbones.items():
        pre = backbone.spec.preprocessing

        def embed(items, backbone=backbone, pre=pre):
            rows = [decode_image(p.read_bytes(), pre, 10**8) for _, p in items]
            return backbone.embed_images(np.stack(rows))

        results[b] = probe_accuracy(
            embed(train), [lab for lab, _ in train], embed(val), [lab for lab, _ in val], 0
        )
        print(f"flowers  {b} {results[b]:.3f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated backbone ids (default: every built-in)")
    parser.add_argument("--variant", default="fp32", help="fp32 or int8 (GRAFT_VARIANT)")
    parser.add_argument("--text-sets", default=",".join(TEXT_SETS), help="e.g. ag_news")
    args = parser.parse_args()
    catalog = Settings().catalog
    ids = args.only.split(",") if args.only else list(catalog)
    loaded, measures = {}, {}
    for backbone_id in ids:
        backbone, memory, ms = load(catalog[backbone_id], args.variant)
        loaded[backbone_id] = backbone
        measures[backbone_id] = (memory, ms)
        print(f"{backbone_id}: {memory / 2**20:.0f} MiB, {ms:.1f} ms per row", flush=True)
    text = bench_text(
        {b: x for b, x in loaded.items() if x.spec.modality == "text"},
        {name: TEXT_SETS[name] for name in args.text_sets.split(",")},
    )
    images = bench_images({b: x for b, x in loaded.items() if x.spec.modality == "image"})
    print(
        "\n| backbone | family | dim | MiB | ms/row | flowers | yelp | amazon | imdb | UCI mean | AG News |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b in [*ids, "auto"]:
        if b == "auto" and not any("auto" in r for r in text.values()):
            continue
        spec = catalog.get(b)
        memory, ms = measures.get(b, (None, None))
        uci = [text[d][b] for d in ("yelp", "amazon", "imdb") if b in text.get(d, {})]
        cells = [
            b,
            spec.family if spec else "(choice)",
            str(spec.embedding_dim) if spec else "",
            f"{memory / 2**20:.0f}" if memory is not None else "",
            f"{ms:.1f}" if ms is not None else "",
            f"{images[b]:.3f}" if b in images else "",
            *(
                f"{text[d][b]:.3f}" if b in text.get(d, {}) else ""
                for d in ("yelp", "amazon", "imdb")
            ),
            f"{statistics.mean(uci):.3f}" if uci else "",
            f"{text['ag_news'][b]:.3f}" if b in text.get("ag_news", {}) else "",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
