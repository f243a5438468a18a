"""Head training time for 100 and 1,000 examples, and what `auto` adds.

    python bench/training_time.py --images ../shared/data/images/flowers \
        --text ../shared/data/text/ag_news/test.csv

In-process, on real embeddings: the flowers photos (train and validation, each also
mirrored, 996 in all) through efficientnet_lite0, and AG News texts through minilm_l6
with their class names as label descriptions. "Head training" is `train_head` whole: every
head type by 5-fold CV, the temperature, the unknown threshold and the final fit. "auto"
is `choose_backbone` on the features of every image backbone: LogME of each, then two
head trainings. Embedding times are given beside them: they dominate creating a head.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.heads import train_head
from adapters.transferability import choose_backbone, logme
from bench.common import image_split, read_texts
from models.export import ensure_onnx
from models.preprocess import decode_image
from models.runtime import Backbone
from service.settings import (
    Settings,
    get_backbone,
    list_backbones,
)

SIZES = (100, 1000)
AG_NEWS_CLASSES = {
    "1": "world news",
    "2": "sports news",
    "3": "business news",
    "4": "science and technology news",
}


def timed(fn, repeat: int = 3):
    """Best of `repeat` wall times (this machine is shared), and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def balanced(labels: list[str], n: int, seed: int = 0) -> np.ndarray:
    """Indices of n rows, as equal per label as the labels allow."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    per_label = {
        c: list(rng.permutation([i for i, y in enumerate(labels) if y == c])) for c in classes
    }
    picked = []
    while len(picked) < n:
        for c in classes:
            if per_label[c] and len(picked) < n:
                picked.append(per_label[c].pop())
    return np.array(picked)


def image_features(
    root: Path, backbone_dir: Path
) -> tuple[dict[str, np.ndarray], list[str], float]:
    """Every image backbone's embeddings of the photos and their mirror images; and the
    lite0 embedding rate (images/s)."""
    items = image_split(root / "train") + image_split(root / "val")
    labels = [label for label, _ in items] * 2
    features, rate = {}, 0.0
    for spec in list_backbones():
        if spec.modality != "image":
            continue
        backbone = Backbone(spec, ensure_onnx(spec, backbone_dir))
        rows = np.stack([decode_image(p.read_bytes(), spec.preprocessing, 10**8) for _, p in items])
        rows = np.concatenate([rows, rows[:, :, ::-1]])  # mirrored: 2 x the examples
        seconds, features[spec.id] = timed(lambda b=backbone, r=rows: b.embed_images(r), repeat=1)
        print(
            f"embedded {len(rows)} images with {spec.id}: {len(rows) / seconds:.0f} images/s",
            flush=True,
        )
        if spec.id == "efficientnet_lite0":
            rate = len(rows) / seconds
    return features, labels, rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True, help="AG News test.csv")
    args = parser.parse_args()
    backbone_dir = Settings().backbone_dir

    features, image_labels, image_rate = image_features(args.images, backbone_dir)
    spec = get_backbone("minilm_l6")
    text = Backbone(spec, ensure_onnx(spec, backbone_dir))
    rows = read_texts(args.text)
    text_labels = [label for label, _ in rows]
    picked = balanced(text_labels, max(SIZES))
    texts = [rows[i][1] for i in picked]
    seconds, text_x = timed(lambda: text.embed_texts(texts), repeat=1)
    text_rate = len(texts) / seconds
    text_labels = [text_labels[i] for i in picked]
    names = dict(
        zip(AG_NEWS_CLASSES, text.embed_texts(list(AG_NEWS_CLASSES.values())), strict=True)
    )

    print(f"\n{'examples':>8}  {'what':<50} {'seconds':>8}")
    for n in SIZES:
        idx = balanced(image_labels, min(n, len(image_labels)))
        y = [image_labels[i] for i in idx]
        x = features["efficientnet_lite0"][idx]
        t, head = timed(lambda x=x, y=y: train_head(x, y))
        print(
            f"{len(idx):>8}  {'image head (lite0, 1280-d), trained':<50} {t:>8.2f}   chose {head.metrics['head_type']}"
        )
        print(f"{len(idx):>8}  {'  embedding them (lite0)':<50} {len(idx) / image_rate:>8.2f}")
        t, _ = timed(lambda x=x, y=y: logme(x, y))
        print(f"{len(idx):>8}  {'  LogME of one backbone':<50} {t:>8.2f}")
        subset = {b: f[idx] for b, f in features.items()}
        t, choice = timed(lambda s=subset, y=y: choose_backbone(s, y, {}), repeat=1)
        print(
            f"{len(idx):>8}  {'  auto: LogME x3 + 2 head trainings':<50} {t:>8.2f}   chose {choice.backbone}"
        )
        y = text_labels[:n]
        t, head = timed(lambda n=n, y=y: train_head(text_x[:n], y, label_embeddings=names))
        print(
            f"{n:>8}  {'text head (minilm, 384-d, label names), trained':<50} {t:>8.2f}   chose {head.metrics['head_type']}"
        )
        print(f"{n:>8}  {'  embedding them (minilm)':<50} {n / text_rate:>8.2f}")


if __name__ == "__main__":
    main()
